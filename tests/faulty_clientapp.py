"""fedgov's own ClientApp, plus a mod that breaks one SuperNode's training replies on the wire.

For tests/test_deployment_secure.py only: it is copied into a test FAB as ``wire_client.py``
(``clientapp = "wire_client:app"``). The SuperNode started with ``--node-config "...
fault=rounds"`` replies to round 1 with a NaN, to round 2 with an array of the wrong shape,
to round 3 with an update a million times too large, and honestly from round 4 on; every
other SuperNode is fedgov's honest cooperative, untouched.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedgov.client_app import app as fedgov_app


def _broken(arrays: ArrayRecord, server_round: int) -> ArrayRecord:
    names = list(arrays.keys())
    values = {name: arrays[name].numpy().copy() for name in names}
    first = names[0]
    if server_round == 1:
        values[first].flat[0] = np.nan
    elif server_round == 2:
        values[first] = values[first][:-1]
    else:
        values = {name: value * 1e6 for name, value in values.items()}
    return ArrayRecord({name: Array(values[name]) for name in names})


def break_train_replies(message: Message, context: Context, call_next):  # noqa: ANN001, ANN201
    reply = call_next(message, context)
    if context.node_config.get("fault") != "rounds" or message.metadata.message_type != "train":
        return reply
    server_round = int(message.content["config"]["server-round"])
    if server_round <= 3 and not reply.has_error():
        reply.content["arrays"] = _broken(reply.content["arrays"], server_round)
    return reply


app = ClientApp(mods=[break_train_replies])


@app.query()
def query(message: Message, context: Context) -> Message:
    return fedgov_app(message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    return fedgov_app(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return fedgov_app(message, context)
