"""Runs inside the vLLM server's workers (``--worker-extension-cls
compaction_vllm_ext.WorkerExtension``), from vLLM's own environment: it must not import the
project. Its methods are called with ``POST /collective_rpc``.
"""


class WorkerExtension:
    def reload_weights_from(self, weights_path: str) -> None:
        """``reload_weights`` from a folder of safetensors, then re-derive a tied LM head.

        vLLM 0.32 reloads layer by layer in place. A tied ``lm_head`` has no weights of its own in
        the checkpoint, so its layer is skipped ("ParallelLMHead: Failed to load weights"), and on
        CPU it keeps the GEMM weights it repacked from the *old* embedding at start-up. Running its
        ``process_weights_after_loading`` again repacks them from the reloaded, shared embedding.
        """
        self.model_runner.reload_weights(weights_path=weights_path)
        model = self.model_runner.get_model()
        config = self.model_runner.model_config.hf_config
        lm_head = getattr(model, "lm_head", None)
        method = getattr(lm_head, "quant_method", None)
        if getattr(config, "tie_word_embeddings", False) and method is not None:
            method.process_weights_after_loading(lm_head)
