"""The reconciler: findings -> plan -> new segment -> verify -> swap."""

from chaosfix.reconcile.run import ReconcileOptions, ReconcileReport, reconcile_palace

__all__ = ["ReconcileOptions", "ReconcileReport", "reconcile_palace"]
