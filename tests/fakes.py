"""Fakes for the peer side of the KV link tests (tests/test_handoff.py, tests/test_pulls.py): a
transfer's pending handle, an outbox that sends every record through the real serializer, and one
pair's link that matches sends and receives as NCCL does. The units under test (ranks/handoff.py,
ranks/pulls.py) are the real ones."""

from __future__ import annotations

import random

import torch

from kvrelay.core.messages import decode, encode


class FakePending:
    """A posted send or receive; the test completes it (`finished`), never the code under test."""

    def __init__(self) -> None:
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def wait(self) -> None:
        assert self.finished, "waited on a transfer the test has not delivered (a real wait would hang)"


class FakeOutbox:
    def __init__(self) -> None:
        self.sent: list[tuple[object, int]] = []

    def send(self, record, dest: int) -> None:
        self.sent.append((decode(record.TAG, encode(record)), dest))  # through the real serializer


class PairTransport:
    """Both ends of one pair's link, matched as NCCL matches them: the k-th send with the k-th
    receive, whatever their tags; a size mismatch means the two sides posted in different orders."""

    def __init__(self) -> None:
        self.sends: list[tuple[torch.Tensor, FakePending]] = []
        self.recvs: list[tuple[torch.Tensor, FakePending]] = []

    def end(self):
        pair = self

        class End:
            def send(self, buf, peer, tag):
                return pair._post(pair.sends, buf)

            def recv(self, buf, peer, tag):
                return pair._post(pair.recvs, buf)

            def close(self) -> None:
                pass

        return End()

    @staticmethod
    def _post(queue, buf) -> FakePending:
        queue.append((buf, FakePending()))
        return queue[-1][1]

    def deliver(self, rng: random.Random | None = None) -> None:
        """Complete the matched pairs (with `rng`, each with probability 1/2, so they land in any
        order): copy the bytes, mark both ends done."""
        for (sbuf, sp), (rbuf, rp) in zip(self.sends, self.recvs):
            if not rp.finished and (rng is None or rng.random() < 0.5):
                assert sbuf.numel() * sbuf.element_size() == rbuf.numel() * rbuf.element_size(), \
                    "transfers posted in different orders on the two sides"
                rbuf.view(torch.uint8).view(-1).copy_(sbuf.contiguous().view(torch.uint8).view(-1))
                sp.finished = rp.finished = True
