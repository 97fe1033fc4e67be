"""Progress while a federation runs, and the table it ends with (rich)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["RoundProgress", "print_summary", "format_bytes"]


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class RoundProgress:
    """A progress bar on stderr, advanced by the ServerApp after each round."""

    def __init__(self, *, total: int, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self._progress = Progress(TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=False)
        self._task: Any = None
        self._plain = enabled and not self.enabled

    def __enter__(self) -> RoundProgress:
        if self.enabled:
            self._progress.start()
            self._task = self._progress.add_task("rounds", total=self.total, status="starting Flower…")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._progress.stop()

    def update(self, row: dict[str, Any]) -> None:
        status = f"accuracy {row['accuracy']:.3f}  loss {row['loss']:.3f}  {row['participants']} cooperatives"
        if self.enabled:
            self._progress.update(self._task, completed=row["round"], status=status)
        elif self._plain:  # not a terminal (CI, pipes): one line per round on stderr
            print(f"round {row['round']}/{self.total}: {status}", file=sys.stderr, flush=True)


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    fair = summary["fairness"]
    table = Table(title=f"fedgov run {summary['run_id']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table.add_row("task", f"{summary['dataset']} / {summary['partition']} / {summary['model']['name']} "
                          f"({summary['model']['num_parameters']:,} parameters) / {summary['strategy']}")
    table.add_row("global accuracy", pct(summary["final_accuracy"]))
    table.add_row("global loss", pct(summary["final_loss"]))
    table.add_row("cooperative accuracy",
                  f"worst {pct(fair['worst'])}  mean {pct(fair['mean'])}  best {pct(fair['best'])}  "
                  f"std {pct(fair['std'])}")
    table.add_row("rounds", str(summary["rounds"]))
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s on {summary['device']}")
    table.add_row("bytes sent", f"up {format_bytes(summary['bytes_up'])}, down {format_bytes(summary['bytes_down'])}")
    privacy = summary.get("privacy") or {}
    if privacy.get("mechanism") == "sample":
        target = privacy.get("target_epsilon")
        text = (f"DP-SGD: largest epsilon {pct(privacy.get('max_epsilon'))}"
                f"{f' (target {target:g})' if target else ''}, delta {privacy.get('delta') or 0:.2g}")
        if privacy.get("seeded_noise"):
            text += f"; noise {privacy.get('noise')}"
        table.add_row("privacy", text)
    influence = summary.get("influence") or {}
    if influence.get("nakamoto") is not None:
        table.add_row("influence", f"{influence['weighting']} weights: Nakamoto {influence['nakamoto']:.1f}  "
                                   f"Gini {influence['gini']:.3f}  largest {influence['max_weight']:.3f}")
    attack = summary.get("attack")
    if attack and attack.get("success_rate") is not None:
        table.add_row("attack", f"{attack['kind']} by cooperative(s) {attack['attackers']}: "
                                f"success {attack['success_rate']:.3f} in the last round")
    compute = summary.get("compute")
    if compute:
        table.add_row("compute", f"slowest cooperatives {compute['slowest']} took part in "
                                 f"{pct(compute['slowest_participation'])} of rounds ({compute['missed']} missed)")
    if (summary.get("secure_aggregation") or {}).get("reveals_updates"):
        table.add_row("secure aggregation", "[bold red]secure.verify: every update was also sent in plaintext; "
                                            "nothing was hidden from the aggregator[/]")
    if summary.get("audit"):
        head = summary["audit"].get("head")
        table.add_row("audit", f"{summary['audit']['records']} signed records, head {head[:16] if head else '-'}… "
                               f"(python -m fedgov.audit verify <run> --head {head or 'HASH'})")
    console.print(table)
