"""Runs one workload on the official ``rlms`` package (import ``rlm``); executed by *its* interpreter.

This file is not imported by rlm_async: ``rlm-async bench`` runs it with the python of a separate virtual
environment that has ``rlms`` installed (never a dependency of rlm_async), pointed at the simulator. It prints
one JSON object: wall seconds, the answer, and the error if the run failed.

    python official_driver.py --base-url URL --query "Fan out 100 sub-calls" [--max-depth 1] [--workers 4]
"""

import argparse
import json
import time
import traceback


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--query", required=True)
    parser.add_argument("--context", default="(no context)")
    parser.add_argument("--model", default="sim-root")
    parser.add_argument("--max-depth", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4, help="max_concurrent_subcalls (the rlms default is 4)")
    args = parser.parse_args()
    started = time.perf_counter()
    record = {"query": args.query, "max_depth": args.max_depth, "workers": args.workers}
    try:
        from rlm import RLM

        rlm = RLM(
            backend="openai",
            backend_kwargs={"model_name": args.model, "base_url": args.base_url, "api_key": "sim"},
            environment="local",
            max_depth=args.max_depth,
            max_concurrent_subcalls=args.workers,
        )
        result = rlm.completion(args.context, root_prompt=args.query)
        record["answer"] = str(getattr(result, "response", result))
        record["ok"] = True
    except Exception as exc:  # the comparison records the peer's failures too
        record["ok"] = False
        record["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    record["wall_s"] = time.perf_counter() - started
    print(json.dumps(record))


if __name__ == "__main__":
    main()
