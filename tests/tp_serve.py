"""``powerfast serve`` on one rank of a torchrun launch, for tests/test_tensor_parallel.py.

    python tests/tp_serve.py OUT serve ARGS...

Before the command runs, this rank's global torch generator is seeded differently from every
other rank's (rank r: 1000 + r), so that any seed drawn from it would differ between ranks
(the silent divergence of unseeded requests); and every request that finishes on this rank
is appended to ``OUT/rank<R>.jsonl`` (id, seed, finish reason, token ids), so that the test
can compare what every rank computed.
"""

import json
import os
import sys

import torch


def main(out_dir: str, *argv: str) -> int:
    rank = int(os.environ["RANK"])
    torch.manual_seed(1000 + rank)
    from powerfast import cli
    from powerfast.serving.engine import Engine

    path = os.path.join(out_dir, f"rank{rank}.jsonl")
    step = Engine._step

    def recorded(self, admit=None):
        outputs = step(self, admit)
        finished = [out for out in outputs if out.finished]
        if finished:
            with open(path, "a") as f:
                for out in finished:
                    f.write(json.dumps({"id": out.request_id, "seed": out.seed, "reason": out.finish_reason,
                                        "token_ids": out.token_ids}) + "\n")
        return outputs

    Engine._step = recorded
    return cli.main(list(argv))


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
