"""The benchmark suite (``make bench``): each scenario paired with a baseline from the same run.

Modules, one concern each: ``options`` (the flags), ``services`` (the bench database and Redis
DB, Django in this process), ``procstat`` (what /proc says about the processes it starts with
``harness.processes``: the fake model server, workers, gunicorn and beat), ``probe`` (imported
into the workers: times every task), ``loadgen`` (the HTTP load generator, its own process),
``scenarios`` (what is measured), ``report`` (the table and ``bench/results/latest.json``) and
``run`` (the order).
"""
