"""`paradiff serve`: a persistent multi-rank HTTP image server (see docs/serve.md).

- `app`: the FastAPI app (validation, limits, API key, metrics endpoint) and uvicorn in a thread, on rank 0;
- `dispatch`: rank 0's bounded queue -> every rank, the loop all ranks run while serving;
- `metrics`: the Prometheus metrics;
- `server`: start-up (load, parallelize, warm up), signals and exit status of one rank.
"""
