"""``chaosfix explore``: every crash state of a workload, judged before and after chaosfix."""
