"""Raw tensors for a model's session (REST and gRPC `inputs`): validation against the declared inputs,
and several requests run as one session call when they stack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class TensorError(ValueError):
    """Tensors a model cannot take (names, dtypes, shapes), and why."""


def check_feeds(session: Any, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Validate request tensors against a session's declared inputs (and asked-for outputs); returns
    the feeds ready to run (strings as object arrays)."""
    declared = {s.name: s for s in session.inputs}
    missing, unknown = sorted(declared.keys() - feeds.keys()), sorted(feeds.keys() - declared.keys())
    if missing or unknown:
        raise TensorError(f"inputs must be exactly {sorted(declared)} (missing {missing}, unknown {unknown})")
    outputs = {o.name for o in session.outputs}
    if output_names and set(output_names) - outputs:
        raise TensorError(f"unknown outputs {sorted(set(output_names) - outputs)} (model outputs: {sorted(outputs)})")
    ready = {}
    for name, array in feeds.items():
        spec = declared[name]
        if spec.dtype == np.dtype(object):
            if array.dtype.kind not in "OUS":
                raise TensorError(f"input {name!r}: the model takes strings, got {array.dtype}")
            array = array.astype(object)
        elif array.dtype != spec.dtype:
            raise TensorError(f"input {name!r}: dtype {array.dtype}, but the model takes {spec.dtype}")
        if spec.shape and (len(array.shape) != len(spec.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape, strict=True))):
            raise TensorError(f"input {name!r}: shape {list(array.shape)}, but the model takes {list(spec.shape)}")
        ready[name] = array
    return ready


def run_requests(session: Any, requests: Sequence[Mapping[str, np.ndarray]],
                 output_names: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Run several requests (validated feeds) for one model; as one session call when they can be
    stacked (every input batch-dynamic, same trailing shapes), split back by each request's batch size.

    `requests[i][name]`: `(n_i, ...)`; result `i` holds outputs of leading dimension `n_i`.
    """
    requests = list(requests)
    names = sorted(requests[0]) if requests else []
    specs = {s.name: s for s in session.inputs}
    sizes = [r[names[0]].shape[0] if names and r[names[0]].ndim else -1 for r in requests]
    stackable = (
        len(requests) > 1 and names and all(specs[n].dynamic_batch for n in names)
        and all(sorted(r) == names for r in requests) and min(sizes) > 0
        and all(r[n].ndim >= 1 and r[n].shape[0] == size for r, size in zip(requests, sizes, strict=True) for n in names)
        and all(len({r[n].shape[1:] for r in requests}) == 1 for n in names)
    )
    if stackable:
        joined = session.run({n: np.concatenate([r[n] for r in requests]) for n in names}, output_names)
        total = sum(sizes)
        if all(o.ndim >= 1 and o.shape[0] == total for o in joined.values()):
            cuts = np.cumsum(sizes)[:-1]
            parts = {n: np.split(o, cuts) for n, o in joined.items()}
            return [{n: parts[n][i] for n in joined} for i in range(len(requests))]
    return [session.run(r, output_names) for r in requests]
