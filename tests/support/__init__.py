"""Helpers shared by the test suite, importable by name (pytest puts tests/ on sys.path).

Not named after anything at the repo root (crds, localkube, operator, worker, ...), which `python -m pytest`
also puts on sys.path.

kube       the API server the tests run against (Kube, local_kube, real_kube, KUBECTL)
models     tiny models and PEFT adapters the tests build themselves (re-exports loraplane.tinymodels)
procs      operator and worker subprocesses (OperatorProc, WorkerProc), wait_for, free_port
fleet      LoRAAdapter objects (Adapters, adapter_obj) and worker reports (report, states)
adapters   PEFT-format adapters and base configs written by hand (good and deliberately broken ones)
servers    moto's S3 server and a local Hub-compatible endpoint (fixtures moto_s3, hf_hub)
chartkit   rendering the Helm chart with Helm's engine, and the value sets
api        the serving tests' reference (reference_greedy, reference_text) and Served / MakeServer
"""
