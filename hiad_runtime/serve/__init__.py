"""`hiad-runtime serve`: the Inspector behind HTTP, for a PLC gateway or a camera PC on the line.

Starlette + uvicorn, torch-free like the rest of the runtime (install the `serve` extra). A bounded
queue in front of a fixed pool of inference threads answers 503 + Retry-After when full; bad input
answers 4xx with a JSON error; a new bundle is verified and warmed up before it replaces the old one.
"""
