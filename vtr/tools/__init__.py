"""Tools built on the API: profiling, benchmarks, latency, pictures, calibration, fidelity, the zoo, CLIP helpers."""
