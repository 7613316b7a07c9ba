# Stage 2 of MoCHA-Vicuna7B. A DDP replica of a 7B model with AdamW does not fit 48 GB (SPEC §7):
# FSDP shards parameters, gradients and optimizer state across the 8 GPUs.
exec(open('config/stage2.py').read())
out_dir = 'out/mocha-vicuna7b-stage2'
init_from = 'out/mocha-vicuna7b-stage1/ckpt'
llm = 'lmsys/vicuna-7b-v1.5'
template = 'vicuna_v1'
parallel = 'fsdp'
