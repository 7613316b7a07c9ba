# MME (14 subtasks, two yes/no questions per image), laid out as LLaVA-1.5's docs/Evaluation.md does:
#   playground/data/eval/MME/llava_mme.jsonl                the questions, from LLaVA's eval.zip
#   playground/data/eval/MME/MME_Benchmark_release_version/ the images and questions_answers_YN tables,
#                                                           from the MME authors (BradyFU/Awesome-Multimodal-
#                                                           Large-Language-Models, Evaluation branch)
# The scorer reads the tables directly: no convert_answer_to_mme.py / eval_tool step is needed.
# python eval.py config/eval_mme.py --ckpt_dir=out/mocha-phi2-stage2/ckpt
benchmark = 'mme'
question_file = 'playground/data/eval/MME/llava_mme.jsonl'
image_folder = 'playground/data/eval/MME/MME_Benchmark_release_version'
mme_root = 'playground/data/eval/MME/MME_Benchmark_release_version'
max_new_tokens = 128
