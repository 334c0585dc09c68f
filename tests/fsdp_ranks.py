"""One rank of a real FSDP-QLoRA wrap on CPU (gloo), run by tests/test_estimate_cards.py through
torch.distributed.run: a 4-bit checkpoint (bf16 quant storage) with peft LoRA, wrapped by FSDP1 as the Trainer
wraps it (peft's fsdp_auto_wrap_policy, use_orig_params=False, bf16 mixed precision, FULL_SHARD). Rank 0 prints
each FSDP unit's flat parameter as JSON: [unsharded elements, this rank's elements, dtype, trainable]."""

import json
import sys

import torch
import torch.distributed as dist


def main(checkpoint: str, rank_r: int) -> None:
    dist.init_process_group("gloo")
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16, bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    model = get_peft_model(model, LoraConfig(r=rank_r, target_modules="all-linear"))
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                   device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
                   mixed_precision=MixedPrecision(torch.bfloat16, torch.bfloat16, torch.bfloat16))
    units = []
    for m in wrapped.modules():
        if isinstance(m, FSDP) and m._handle is not None:
            flat = m._handle.flat_param
            units.append([flat._unpadded_unsharded_size.numel(), flat.numel(), str(flat.dtype), flat.requires_grad])
    if dist.get_rank() == 0:
        print("UNITS " + json.dumps(units))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
