# Stage 2 of MoCHA-Vicuna7B with LoRA adapters on the LLM (config/stage2_lora.py says whose recipe):
#   torchrun --nproc_per_node=8 train.py config/stage2_vicuna7b_lora.py
exec(open('config/stage2_vicuna7b.py').read())
out_dir = 'out/mocha-vicuna7b-stage2-lora'
lora_rank = 128
lora_alpha = 256
lora_dropout = 0.05
learning_rate = 2e-4
connector_lr_scale = 0.1
merge_lora = True
