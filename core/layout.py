"""The job's layout: the role of every rank. Rank 0 routes, then the prefill, decode and aggregated
workers, in that order, as many as the config's `roles` section says."""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.configs.schema import RolesSection


class LaunchError(RuntimeError):
    """The job cannot start as launched; the message says what to change."""


@dataclass(frozen=True)
class Layout:
    """Role of every rank: rank 0 routes, then prefill, decode and aggregated workers."""

    prefill: int
    decode: int
    aggregated: int

    @classmethod
    def from_roles(cls, roles: RolesSection) -> Layout:
        # NOTE: the sharded model, its checks and the KV-head regrouping between groups exist
        # (ranks/engine/sharding.py, parallel.py, step_sync.py), but the job does not yet run a
        # worker as a group of ranks; until it does, a tp > 1 would silently run one rank per
        # worker, so it stops here, before any rank starts.
        wide = [f"{roles.tp_key(r)}={roles.tp_of(r)}" for r in ("prefill", "decode", "aggregated")
                if getattr(roles, r) and roles.tp_of(r) > 1]
        if wide:
            raise LaunchError(f"{', '.join(dict.fromkeys(wide))}: tensor-parallel worker groups do not run in a job yet; "
                              "set roles.tp (and roles.prefill_tp/decode_tp/aggregated_tp) to 1, with a model that fits one device")
        return cls(roles.prefill, roles.decode, roles.aggregated)

    @property
    def world_size(self) -> int:
        return 1 + self.prefill + self.decode + self.aggregated

    def role(self, rank: int) -> str:
        if rank == 0:
            return "router"
        if rank <= self.prefill:
            return "prefill"
        if rank <= self.prefill + self.decode:
            return "decode"
        return "aggregated"

    def ranks(self, role: str) -> list[int]:
        return [r for r in range(1, self.world_size) if self.role(r) == role]

    @property
    def workers(self) -> list[int]:
        return list(range(1, self.world_size))

    def describe(self) -> str:
        return (
            f"1 router + {self.prefill} prefill + {self.decode} decode + {self.aggregated} aggregated "
            f"= {self.world_size} ranks"
        )

    def check_world(self, size: int) -> None:
        if size != self.world_size:
            raise LaunchError(
                f"the job was started with {size} ranks but the config asks for {self.describe()}; "
                f"start it with -n {self.world_size} or change roles.prefill/decode/aggregated"
            )
