"""Small ClientApps for testing the engines: each node counts its rounds in ``context.state``.

A train message's ``config`` record can name partitions that misbehave: ``raise`` (the
ClientApp raises), ``sleep`` (it sleeps ``sleep-seconds``), ``hang`` (it writes its PID to
``pid-file`` and sleeps, for a test to kill), ``mutate`` (it changes the content it received).
"""

import os
import random
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp


def _count(context: Context) -> int:
    return int(context.state["count"]["n"]) if "count" in context.state else 0


def counting_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config = message.content["config"]
        partition = int(context.node_config["partition-id"])
        if partition in list(config.get("raise", [])):
            raise ValueError(f"cooperative {partition} broke")
        if partition in list(config.get("sleep", [])):
            time.sleep(float(config["sleep-seconds"]))
        if partition in list(config.get("hang", [])):
            with open(str(config["pid-file"]), "w") as handle:
                handle.write(str(os.getpid()))
            time.sleep(60)
        seen_mutation = bool(config.get("mutated", False))
        if partition in list(config.get("mutate", [])):
            config["mutated"] = True
        n = _count(context) + 1
        context.state["count"] = ConfigRecord({"n": n})
        metrics = MetricRecord({"n": n, "partition": partition, "pid": os.getpid(),
                                "num-partitions": int(context.node_config["num-partitions"]),
                                "saw-mutation": int(seen_mutation)})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        # Changes every process-wide generator and the thread count: the server's must not move.
        torch.manual_seed(1234)
        np.random.seed(1234)
        random.seed(1234)
        torch.set_num_threads(1)
        return Message(RecordDict({"metrics": MetricRecord({"n": _count(context), "pid": os.getpid()})}),
                       reply_to=message)

    return app


def broken_app() -> ClientApp:
    raise RuntimeError("this ClientApp cannot be built")
