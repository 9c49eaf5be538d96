"""The job's layout: the role of every rank. Rank 0 routes, then the prefill, decode and aggregated
workers, in that order, as many as the config's `roles` section says. A worker is a group of its
role's tp consecutive ranks (a tensor-parallel group); its first rank, the leader, is the worker
the router sees: placement, the cache window and every control message use the leaders' ranks.

    1 prefill (tp=2) + 1 decode (tp=1):  rank 0 router | 1, 2 prefill (leader 1) | 3 decode
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.configs.schema import RolesSection

ROLES = ("prefill", "decode", "aggregated")


class LaunchError(RuntimeError):
    """The job cannot start as launched; the message says what to change."""


@dataclass(frozen=True)
class Layout:
    """Role of every rank: rank 0 routes, then prefill, decode and aggregated worker groups."""

    prefill: int
    decode: int
    aggregated: int
    prefill_tp: int = 1
    decode_tp: int = 1
    aggregated_tp: int = 1

    @classmethod
    def from_roles(cls, roles: RolesSection) -> Layout:
        return cls(roles.prefill, roles.decode, roles.aggregated,
                   roles.tp_of("prefill"), roles.tp_of("decode"), roles.tp_of("aggregated"))

    def tp(self, role: str) -> int:
        return getattr(self, f"{role}_tp")

    @property
    def sharded(self) -> bool:
        """Some worker is a tensor-parallel group: KV moves between workers shard by shard."""
        return max(self.prefill_tp, self.decode_tp, self.aggregated_tp) > 1

    def pulls_from_host(self, host_kv_gib: float, simulated: bool) -> bool:
        """With router.pulls, a source also sends blocks of its host KV tier (ranks/pulls.py):
        between single ranks, whose chunks leave as one packed buffer (a group's ranks each send
        their shard of GPU blocks; they do not send from their host tiers), or simulated workers."""
        return host_kv_gib > 0 and (simulated or not self.sharded)

    @property
    def groups(self) -> list[tuple[str, int, int]]:
        """(role, leader rank, ranks) of every worker, in rank order."""
        out, rank = [], 1
        for role in ROLES:
            for _ in range(getattr(self, role)):
                out.append((role, rank, self.tp(role)))
                rank += self.tp(role)
        return out

    @property
    def world_size(self) -> int:
        return 1 + sum(size for _, _, size in self.groups)

    def group_of(self, rank: int) -> tuple[str, int, int]:
        """(role, leader rank, ranks) of the worker that `rank` belongs to; the router is its own group."""
        if rank == 0:
            return "router", 0, 1
        for role, leader, size in self.groups:
            if leader <= rank < leader + size:
                return role, leader, size
        raise ValueError(f"rank {rank} is outside the layout's {self.world_size} ranks")

    def role(self, rank: int) -> str:
        return self.group_of(rank)[0]

    def leader(self, rank: int) -> int:
        return self.group_of(rank)[1]

    def ranks(self, role: str) -> list[int]:
        """The leaders of `role`'s workers."""
        return [leader for r, leader, _ in self.groups if r == role]

    @property
    def workers(self) -> list[int]:
        """Every worker's leader: the ranks the router talks to."""
        return [leader for _, leader, _ in self.groups]

    def describe(self) -> str:
        def part(role: str) -> str:
            n, tp = getattr(self, role), self.tp(role)
            return f"{n} {role}" + (f" (tp={tp})" if n and tp > 1 else "")

        return f"1 router + {part('prefill')} + {part('decode')} + {part('aggregated')} = {self.world_size} ranks"

    def check_world(self, size: int) -> None:
        if size != self.world_size:
            raise LaunchError(
                f"the job was started with {size} ranks but the config asks for {self.describe()}; "
                f"start it with -n {self.world_size} or change roles.prefill/decode/aggregated (and roles.*tp)"
            )
