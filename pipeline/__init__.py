"""qpipe's machine-learning side: spec, data ingestion, models, training, quantization,
benchmarking, reports and the artifact store. Pure functions over typed configs and artifact
references; this package never imports celery."""
