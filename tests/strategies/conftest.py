import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity():
    # Messages need a run identity; the simulation engine sets one the same way.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class FakeGrid:
    """The part of Flower's Grid a strategy's configure step uses: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


CUSTODIAN_NODE = 999


class CustodianGrid(FakeGrid):
    """A FakeGrid with a custodian node behind it that answers decryption requests as the real one does."""

    def __init__(self, node_ids, key_dir):
        from flwr.app import Context, RecordDict

        from fedgov.crypto import SecretKeys
        from fedgov.crypto.keys import CUSTODIAN_KEYS

        super().__init__(node_ids)
        from fedgov.crypto.keys import load_check_key

        self._keys = SecretKeys.from_bytes((key_dir / CUSTODIAN_KEYS).read_bytes())
        self.check_key = load_check_key(key_dir)
        self.context = Context(run_id=1, node_id=CUSTODIAN_NODE, node_config={"role": "custodian"},
                               state=RecordDict(), run_config={})
        self.requests = []

    def send_and_receive(self, messages, *, timeout=None):
        from fedgov.decryption import answer_decrypt_request

        replies = []
        for message in messages:
            assert message.metadata.dst_node_id == CUSTODIAN_NODE, "only the custodian is asked here"
            self.requests.append(message)
            replies.append(answer_decrypt_request(message, self.context, keys=self._keys, check_key=self.check_key))
        return replies
