# Stage 2 of MoCHA-Phi2 with LoRA adapters on the LLM instead of its full fine-tune, on LLaVA-1.5's LoRA recipe
# (scripts/v1_5/finetune_lora.sh: --lora_r 128 --lora_alpha 256, lora_dropout 0.05, learning rate 2e-4 with the
# projector at --mm_projector_lr 2e-5):
#   torchrun --nproc_per_node=8 train.py config/stage2_lora.py
# The adapters go on every linear layer of Phi-2 but its head (peft); the MoECs train in full. A checkpoint holds
# the MoECs and the adapters alone; at the end out_dir/merged holds the merged model, which eval.py loads like any
# other (eval.py also loads the unmerged checkpoint).
# Memory per GPU, traced by `python bench.py --table=memory` (8 GPUs; docs/benchmarks.md): FSDP (stage 2's default)
# peaks at 15.2 GiB, so 8x24 GB cards take it as it is; DDP at 31.6 GiB fits 8x48 and 8x80 GB.
exec(open('config/stage2.py').read())
out_dir = 'out/mocha-phi2-stage2-lora'
lora_rank = 128
lora_alpha = 256
lora_dropout = 0.05
learning_rate = 2e-4           # finetune_lora.sh's, 10x the full fine-tune's
connector_lr_scale = 0.1       # the MoECs at 2e-5, as its mm_projector_lr
merge_lora = True
