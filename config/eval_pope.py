# POPE on COCO val2014, laid out as LLaVA-1.5's docs/Evaluation.md does (playground/data/eval/pope/):
#   llava_pope_test.jsonl  the questions, from LLaVA's eval.zip (with "category": random|popular|adversarial)
#   coco/coco_pope_{random,popular,adversarial}.json  the labels, from github.com/AoiDragon/POPE output/coco
#                          (LLaVA used commit e3e39262, whose random split has 2910 lines)
#   val2014/               the COCO 2014 val images, from cocodataset.org
# python eval.py config/eval_pope.py --ckpt_dir=out/mocha-phi2-stage2/ckpt
benchmark = 'pope'
question_file = 'playground/data/eval/pope/llava_pope_test.jsonl'
image_folder = 'playground/data/eval/pope/val2014'
annotation_dir = 'playground/data/eval/pope/coco'
max_new_tokens = 128  # LLaVA's default; the answers are a word or a short sentence
