# GQA testdev-balanced (12 578 questions), laid out as LLaVA-1.5's docs/Evaluation.md does:
#   playground/data/eval/gqa/llava_gqa_testdev_balanced.jsonl  the questions, from LLaVA's eval.zip
#   playground/data/eval/gqa/data/images/                       GQA's images, from cs.stanford.edu/people/dorarad/gqa
#   playground/data/eval/gqa/data/testdev_balanced_questions.json  GQA's questions (with answers and types),
#                                                                 from the same GQA download
# torchrun --standalone --nproc_per_node=8 eval.py config/eval_gqa.py --ckpt_dir=out/mocha-phi2-stage2/ckpt
benchmark = 'gqa'
question_file = 'playground/data/eval/gqa/llava_gqa_testdev_balanced.jsonl'
image_folder = 'playground/data/eval/gqa/data/images'
questions_json = 'playground/data/eval/gqa/data/testdev_balanced_questions.json'
max_new_tokens = 128
