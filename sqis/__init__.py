"""The application: the `sqis` CLI root, the demo supervisor and the benchmarks (the top floor).

Everything below (producers, inference_workers, sinks, training, stream_processors, infra, schemas)
imports nothing from here.
"""
