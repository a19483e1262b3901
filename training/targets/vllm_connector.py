"""The KV connector behind the vllm backend's features: vLLM's hidden-state writer, on any device.

vLLM's `extract_hidden_states` speculative method stores, per prompt token, the residual stream at
the requested layers in a cache-only KV layer; its ExampleHiddenStatesConnector copies a finished
request's slots out to a safetensors file. That connector copies through CUDA streams, events and
pinned host buffers, so on vLLM's CPU build it kills the engine ("pin_memory=True requires a CUDA
or other accelerator backend"). This subclass keeps the connector's scheduler side (file names,
lock files, block bookkeeping) and replaces only the copy: a plain blocking `.to("cpu")`, which is
a no-op on CPU and a synchronous device-to-host copy on a GPU. The disk write stays on the
connector's thread pool behind the per-file lock the reader waits on, so one code path serves both.

vLLM loads it by module path (`kv_connector_module_path`), the way it loads any external
connector; this module is imported only inside vLLM's engine process, so it may import vLLM at
module level. Checked against vLLM 0.32.0 (the version both the CPU build and the `gpu` extra pin).
"""

from __future__ import annotations

import fcntl
import os

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)

CONNECTOR = "SpecdraftHiddenStatesConnector"


class _Copied:
    """Stands where the parent keeps a CUDA event: the copy finished before this was made."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class SpecdraftHiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        block_size = self._block_size
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).flatten()
        hidden = extract_from_kv_cache(self._kv_cache, slots.to(self._kv_cache.device), pending.token_ids.shape[0])
        tensors = {"hidden_states": hidden.to("cpu").contiguous(), "token_ids": pending.token_ids.clone()}

        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        done = _Copied()
        future = self._executor.submit(self._write_tensors, tensors, done, pending.filename, lock_fd)
        self._req_copy_events[pending.req_id] = done  # get_finished reports the request as sent
        self._req_futures[pending.req_id] = future
        future.add_done_callback(lambda f, req_id=pending.req_id: self._on_write_done(req_id, f))
