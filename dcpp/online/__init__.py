"""dcpp's engine-agnostic online core: what runs inside a serving engine's scheduler without
knowing which engine it is (no vLLM import anywhere below this package).

`runtime.DcppRuntime` wires the parts: per-request chunk sizing (`chunk_sizer`,
`request_options`), the steps in flight (`step_ledger`), each prefill's chunks (`prefill_log`),
the workers' step times (`stage_timing`, through an engine's `WorkerChannel`), measured bubbles
(`bubbles`) and calibration (`calibration/`). An engine adapter (`dcpp.integration.vllm`) turns
its scheduler's objects into the plain values these parts take.
"""
