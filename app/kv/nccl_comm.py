"""The KV channel's link over a `PairNccl` group (`app.kv.channel.Communicator`).

What goes where: a transfer's header travels as a control message through the pair's store (so an idle
pair holds no NCCL receive on the GPU), its payload over NCCL with the transfer deadline. The sender's
peer watch (`KVSender(watch_peer=True)`, the receive of `TAG_RELEASE`) blocks in `wait_peer_gone()`: NCCL
pairs have no shared-memory segments to give back, so that receive only ever ends when the decode
replica's process or group is gone, which breaks the pair at once instead of at the next send's deadline.
"""

from __future__ import annotations

import torch

from app.kv.channel import TAG_HEADER
from app.kv.nccl_group import PairNccl
from app.kv.nccl_ops import NcclPairError, nbytes
from app.kv.shm import TAG_RELEASE


class NcclPairComm:
    """The channel's link over a `PairNccl` group: headers as control messages through the pair's store,
    payloads over NCCL, each NCCL operation bounded by the transfer deadline."""

    def __init__(self, group: PairNccl, peer_rank: int, timeout_s: float):
        self.group = group
        self.peer_rank = peer_rank
        self.timeout_s = timeout_s
        self.device = group.device

    def send(self, tensor: torch.Tensor, tag: int, timeout_s: float | None) -> None:
        if tag == TAG_HEADER:
            self.group.send_control(tensor.detach().cpu().contiguous().numpy().tobytes(), self.peer_rank)
        else:
            self.group.send_tagged(tensor, self.peer_rank, tag, self.timeout_s if timeout_s is None else timeout_s)

    def recv(self, tensor: torch.Tensor, tag: int) -> None:
        if tag == TAG_HEADER:
            data = self.group.recv_control(self.peer_rank)
            if len(data) != nbytes(tensor):
                raise NcclPairError(f"control message of {len(data)} bytes, expected {nbytes(tensor)}")
            tensor.copy_(torch.frombuffer(bytearray(data), dtype=tensor.dtype).view(tensor.shape))
        elif tag == TAG_RELEASE:
            self.group.wait_peer_gone()  # raises once the peer is gone or this side destroyed the group
        else:
            # The header came first, so the sender is sending now: the payload has the transfer deadline.
            self.group.recv_tagged(tensor, self.peer_rank, tag, self.timeout_s)

    def close(self) -> None:
        self.group.destroy_group()


__all__ = ["NcclPairComm"]
