# MoVA-Phi2, stage 2 with its routing (docs/mova.md): config/mova_stage2.py's recipe from the same stage-1 checkpoint,
# on the instruct data with MoVA's routing conversations mixed in and each labelled sample's experts, which mova.py
# writes first from the every-expert stage 2 (an expert is right for a question when, alone, it lowers the loss of
# its answer):
#   python mova.py --ckpt_dir=out/mova-phi2-stage2/ckpt --data_json=playground/data/llava_v1_5_mix665k.json --image_folder=playground/data --out_dir=out/mova-routing
#   torchrun --nproc_per_node=8 train.py config/mova_stage2_routed.py
#   python eval.py config/eval_gqa.py --ckpt_dir=out/mova-phi2-routed/ckpt --route=llm
exec(open('config/mova_stage2.py').read())
out_dir = 'out/mova-phi2-routed'
data_json = 'out/mova-routing/instruct.json'   # Phi-2's byte-level BPE reads the routing prompt: no tokenizer to grow
