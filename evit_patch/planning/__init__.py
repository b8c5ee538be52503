"""Planning: analytic MACs, budgets, calibrated schedules and the ``explain`` table, all read from a profile."""
