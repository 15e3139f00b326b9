"""Calibration from live step timings: the calibrator (`calibrator`), the per-step overhead
(`step_overhead`), the first fit where start-up profiling cannot run (`live_fit`), the noise
floor of repeated steps (`noise`), and persistence beside the profile (`saver`, `store`)."""
