"""The benchmark harness: `sqis bench ...` and the helpers the tests share with it.

- `harness`: frame publishers, topic collectors, worker pools and chaos runs (tests use these too);
- `pipeline`: the bare model against producer -> Kafka -> workers -> inspections, soak, chaos, model;
- `providers`: the model alone on execution providers (`bench model`; cpu, openvino, their INT8 files, side by side);
- `bomb`: decompression-bomb images; `segment`: SAM and YOLOv8-seg timings; `sizing`: storage sizing.

The application floor (`sqis.cli`, `sqis.demo`) imports from here only inside commands.
"""
