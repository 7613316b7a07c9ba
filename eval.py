"""
Evaluate a nanoMoCHA checkpoint: greedy answers to LLaVA-style question files,
scored with the official rules of POPE, GQA and MME (their own evaluation scripts, re-typed).

    python eval.py --ckpt_dir=out/shapes/ckpt                   # the three shapes benchmarks
    python eval.py config/eval_pope.py --ckpt_dir=out/mocha-phi2-stage2/ckpt   # real POPE (also eval_gqa.py, eval_mme.py)
    torchrun --standalone --nproc_per_node=8 eval.py config/eval_gqa.py --ckpt_dir=out/mocha-phi2-stage2/ckpt
    python eval.py --ckpt_dir=out/shapes/ckpt --image=data/shapes/images/000000.png --question="What shape is this?"
    python eval.py --ckpt_dir=out/shapes/ckpt --image=data/shapes/images/000000.png --explain=explain.png

The scorers re-implement, without copying, what LLaVA runs:
- answering: llava/eval/model_vqa_loader.py ("<image>\n" + question, greedy, answers jsonl);
- POPE: llava/eval/eval_pope.py;
- GQA: scripts/convert_gqa_for_eval.py + the GQA release's eval/eval.py;
- MME: playground/data/eval/MME/convert_answer_to_mme.py + MME's eval_tool/calculation.py.
Two deliberate differences, both so that nothing is scored by accident: answers are
matched to questions by id (the official tools pair lines by position, which gives
the same numbers when the files are complete and in order), and questions without an
answer are reported (count + ids, and a printed warning) instead of crashing or being
counted. Every accuracy-like number is a percentage; MME scores are points.
"""
import glob
import json
import math
import os
import time
from collections import Counter, defaultdict
from contextlib import nullcontext

import torch
import torch.distributed as dist

import data

# -----------------------------------------------------------------------------
# jsonl files and answer records

def read_jsonl(path):
    """The records of a jsonl file (blank lines skipped); a bad line names the file and line number."""
    records = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg}): {line.strip()[:120]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {line.strip()[:120]!r}")
            records.append(record)
    return records

# MME asks two questions per image under one question_id, so the question text is part of what
# identifies a question (its 'text') and the answer to it (whose 'prompt' is that text).
def question_key(question):
    return str(question['question_id']), question['text']

def answer_key(answer):
    return str(answer['question_id']), answer['prompt']

def index_by(records, key, what):
    """{key(record): record}; a repeated key is an error (a resumed run that answered twice, a merged file)."""
    index = {}
    for record in records:
        k = key(record)
        if k in index:
            raise ValueError(f"{what}: question {k} appears twice")
        index[k] = record
    return index

def missing_report(benchmark, missing_ids, num_questions):
    """Questions without an answer are neither right nor wrong: count them, name them, warn."""
    if missing_ids:
        shown = ', '.join(str(i) for i in missing_ids[:5]) + (', ...' if len(missing_ids) > 5 else '')
        print(f"warning: {benchmark}: {len(missing_ids)} of {num_questions} questions have no answer "
              f"and are not scored ({shown})")
    return dict(num_missing=len(missing_ids), missing_ids=list(missing_ids))

def percent(numerator, denominator):
    return 100.0 * numerator / denominator if denominator else None

# -----------------------------------------------------------------------------
# POPE (llava/eval/eval_pope.py)

POPE_SPLITS = ('random', 'popular', 'adversarial')

def pope_prediction(text):
    """POPE's evaluate.py, as LLaVA runs it: the text before the first '.', commas dropped, split on spaces; any word
    'No', 'not' or 'no' makes it 'no', anything else (even '' or 'NO') is 'yes'."""
    words = text.split('.')[0].replace(',', '').split(' ')
    return 'no' if any(word in ('No', 'not', 'no') for word in words) else 'yes'

def yes_no_metrics(predictions, labels):
    """Accuracy, precision, recall, F1 (yes = positive) and yes-ratio, in percent. A zero denominator
    (no 'yes' predicted, say) gives 0 for precision/recall/F1 (the official script would divide by zero)."""
    pairs = list(zip(predictions, labels))
    tp = sum(p == 'yes' and l == 'yes' for p, l in pairs)
    fp = sum(p == 'yes' and l == 'no' for p, l in pairs)
    tn = sum(p == 'no' and l == 'no' for p, l in pairs)
    fn = sum(p == 'no' and l == 'yes' for p, l in pairs)
    if not pairs:
        precision = recall = f1 = None
    else:
        precision = percent(tp, tp + fp) or 0.0
        recall = percent(tp, tp + fn) or 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=percent(tp + tn, len(pairs)), precision=precision, recall=recall, f1=f1,
                yes_ratio=percent(tp + fp, len(pairs)), tp=tp, fp=fp, tn=tn, fn=fn, questions=len(pairs))

def pope_judgements(answers, question_file, annotation_dir):
    """Each POPE question judged: {split: [(question_id, prediction, label, positives)]} for the splits present
    (annotation_dir/coco_pope_{split}.json), and the ids of questions with no answer. A split's label lines pair, in
    order, with the question file's questions of that category (as the official script assumes); answers pair with
    questions by id; positives: how many present objects the split asks about in that question's image. score_pope
    counts these; ablate.py reads them question by question."""
    questions = read_jsonl(question_file)
    answer_by_id = index_by(answers, lambda a: str(a['question_id']), 'POPE answers')
    question_ids = {str(q['question_id']) for q in questions}
    unknown = [qid for qid in answer_by_id if qid not in question_ids]
    if unknown:
        raise ValueError(f"POPE: {len(unknown)} answers have question ids not in {question_file}: {unknown[:5]}")
    judged, missing_ids = {}, []
    for split in POPE_SPLITS:
        label_file = os.path.join(annotation_dir, f'coco_pope_{split}.json')
        if not os.path.exists(label_file):
            continue
        labels = read_jsonl(label_file)  # jsonl despite the .json name
        split_questions = [q for q in questions if q.get('category') == split]
        if len(labels) != len(split_questions):
            raise ValueError(f"{label_file} has {len(labels)} labels but {question_file} has "
                             f"{len(split_questions)} questions of category {split!r}")
        judged[split] = []
        positives = Counter(label.get('image') for label in labels if label.get('label') == 'yes')
        for line_number, (question, label) in enumerate(zip(split_questions, labels), 1):
            if 'image' in label and label['image'] != question.get('image'):
                raise ValueError(f"{label_file}:{line_number}: label is for image {label['image']} but the "
                                 f"{split} question {question['question_id']} is about {question.get('image')}")
            if label.get('label') not in ('yes', 'no'):
                raise ValueError(f"{label_file}:{line_number}: expected label 'yes' or 'no', got {label.get('label')!r}")
            answer = answer_by_id.get(str(question['question_id']))
            if answer is None:
                missing_ids.append(question['question_id'])
                continue
            judged[split].append((question['question_id'], pope_prediction(answer['text']), label['label'],
                                  positives[label.get('image')]))
    if not judged:
        raise FileNotFoundError(f"no coco_pope_{{{','.join(POPE_SPLITS)}}}.json in {annotation_dir}")
    return judged, missing_ids

def score_pope(answers, question_file, annotation_dir):
    """POPE per split and 'f1_avg', the mean F1 over them (the paper's POPE number), from pope_judgements.
    'by_positives': all splits' questions again, grouped by how many present objects POPE asks about in
    their image (real POPE: 3 in every image; the shapes world: its 1-3 objects), to tell 'cannot check
    one object' from 'cannot find it among several'."""
    judged, missing_ids = pope_judgements(answers, question_file, annotation_dir)
    results, by_positives = {}, defaultdict(list)  # present objects asked about in the image -> [(prediction, label)]
    for split, rows in judged.items():
        for _, prediction, label, positives in rows:
            by_positives[positives].append((prediction, label))
        results[split] = yes_no_metrics([row[1] for row in rows], [row[2] for row in rows])
    f1s = [metrics['f1'] for metrics in results.values() if metrics['f1'] is not None]
    results['f1_avg'] = sum(f1s) / len(f1s) if f1s else None
    results['by_positives'] = {str(n): yes_no_metrics(*zip(*by_positives[n]))  # str: as results.json keeps keys
                               for n in sorted(by_positives)}
    num_questions = sum(len(rows) for rows in judged.values()) + len(missing_ids)
    results.update(missing_report('POPE', missing_ids, num_questions))
    return results

# -----------------------------------------------------------------------------
# GQA (scripts/convert_gqa_for_eval.py + GQA's eval/eval.py)

def gqa_judgements(answers, questions_json):
    """Each balanced question of a GQA questions JSON (testdev_balanced_questions.json: {qid: {answer, types:
    {structural, ...}, isBalanced, ...}}) judged: [(qid, correct, 'open' or 'binary', types.detailed or None)], and the
    ids of questions with no answer. Prediction = answer text with trailing '.' stripped, lower-cased; GQA's eval.py
    scores the balanced subset only and calls a question 'open' when types.structural is 'query', 'binary' otherwise
    (verify, logical, compare, choose). score_gqa counts these; ablate.py reads them question by question."""
    with open(questions_json) as f:
        questions = json.load(f)
    answer_by_id = index_by(answers, lambda a: str(a['question_id']), 'GQA answers')
    unknown = [qid for qid in answer_by_id if qid not in questions]
    if unknown:
        raise ValueError(f"GQA: {len(unknown)} answers have question ids not in {questions_json}: {unknown[:5]}")
    judged, missing_ids = [], []
    for qid, question in questions.items():
        if not question.get('isBalanced', True):
            continue
        if qid not in answer_by_id:
            missing_ids.append(qid)
            continue
        prediction = answer_by_id[qid]['text'].rstrip('.').lower()
        judged.append((qid, prediction == question['answer'],
                       'open' if question['types']['structural'] == 'query' else 'binary',
                       question['types'].get('detailed')))
    return judged, missing_ids

def score_gqa(answers, questions_json):
    """Exact-match accuracy, from gqa_judgements, overall, on binary and open questions, and 'by_type': accuracy per
    types.detailed (queryPosition, existAttrC, ...), which says what a model can and cannot do."""
    judged, missing_ids = gqa_judgements(answers, questions_json)
    correct, by_type = defaultdict(list), defaultdict(list)  # 'binary' / 'open', types.detailed -> [bool]
    for _, right, answer_type, detailed in judged:
        correct[answer_type].append(right)
        if detailed is not None:
            by_type[detailed].append(right)
    every = correct['binary'] + correct['open']
    return dict(accuracy=percent(sum(every), len(every)),
                binary=percent(sum(correct['binary']), len(correct['binary'])),
                open=percent(sum(correct['open']), len(correct['open'])),
                questions=len(every),
                by_type={kind: percent(sum(right), len(right)) for kind, right in by_type.items()},
                **missing_report('GQA', missing_ids, len(judged) + len(missing_ids)))

# -----------------------------------------------------------------------------
# MME (convert_answer_to_mme.py + eval_tool/calculation.py)

MME_PERCEPTION = ('existence', 'count', 'position', 'color', 'posters', 'celebrity', 'scene',
                  'landmark', 'artwork', 'OCR')
MME_COGNITION = ('commonsense_reasoning', 'numerical_calculation', 'text_translation', 'code_reasoning')
SHORT_ANSWER = 'Answer the question using a single word or phrase.'  # LLaVA's suffix in llava_mme.jsonl
YES_OR_NO = ' Please answer yes or no.'  # MME's own suffix in questions_answers_YN

def mme_prediction(text):
    """MME's eval_tool/calculation.py: lower-cased; exactly 'yes'/'no', else 'yes' if 'yes' is in the first
    four characters, else 'no' if 'no' is (so 'not sure' is 'no'), else 'other' (always wrong)."""
    text = text.lower()
    if text in ('yes', 'no'):
        return text
    return 'yes' if 'yes' in text[:4] else 'no' if 'no' in text[:4] else 'other'

def read_mme_ground_truth(mme_root):
    """{(subtask, txt_file, question): 'yes'|'no'} from the MME release. Both of its layouts:
    <subtask>/images/ + <subtask>/questions_answers_YN/*.txt (artwork, celebrity, landmark, posters, scene)
    and images and *.txt side by side in <subtask>/ (the others). A line is 'question<TAB>answer'."""
    truth = {}
    for subtask in sorted(os.listdir(mme_root)):
        subtask_dir = os.path.join(mme_root, subtask)
        if not os.path.isdir(subtask_dir):
            continue
        has_images_dir = os.path.isdir(os.path.join(subtask_dir, 'images'))
        table_dir = os.path.join(subtask_dir, 'questions_answers_YN') if has_images_dir else subtask_dir
        if not os.path.isdir(table_dir):
            raise FileNotFoundError(f"{subtask_dir} has images/ but no questions_answers_YN/")
        for txt_file in sorted(os.listdir(table_dir)):
            if not txt_file.endswith('.txt'):
                continue
            path = os.path.join(table_dir, txt_file)
            with open(path) as f:
                for line_number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    fields = line.strip().split('\t')
                    if len(fields) != 2 or fields[1].lower() not in ('yes', 'no'):
                        raise ValueError(f"{path}:{line_number}: expected 'question<TAB>yes|no', got {line.strip()!r}")
                    truth[(subtask, txt_file, fields[0])] = fields[1].lower()
    if not truth:
        raise FileNotFoundError(f"no MME questions_answers_YN tables under {mme_root}")
    return truth

def mme_table_key(answer, truth):
    """The (subtask, txt_file, question) row an answer belongs to, as convert_answer_to_mme.py finds it:
    question_id is '<subtask>/<image file>', the table is '<image name up to the first dot>.txt', and the
    prompt loses LLaVA's short-answer line and regains MME's ' Please answer yes or no.' (with two spaces
    before it where the table has two)."""
    question_id = str(answer['question_id'])
    subtask = question_id.split('/')[0]
    txt_file = question_id.split('/')[-1].split('.')[0] + '.txt'
    question = answer['prompt']
    if SHORT_ANSWER in question:
        question = question.replace(SHORT_ANSWER, '').strip()
    if YES_OR_NO.strip() not in question:
        question = question + YES_OR_NO
        if (subtask, txt_file, question) not in truth:
            question = question.replace(YES_OR_NO, ' ' + YES_OR_NO)
    return subtask, txt_file, question

def score_mme(answers, mme_root):
    """Per subtask acc, acc+ (images with all their questions right / images) and score = acc + acc+
    (percent, i.e. 100·acc + 100·acc+ of calculation.py), plus 'perception' and 'cognition', the sums of
    the scores of the subtasks present. Images are grouped by name (calculation.py takes consecutive line
    pairs, the same thing for complete, ordered files); an image with an unanswered question is left out
    of acc+."""
    truth = read_mme_ground_truth(mme_root)
    prediction_by_row = {}
    for answer in answers:
        row = mme_table_key(answer, truth)
        if row not in truth:
            raise ValueError(f"MME answer to question {answer['question_id']} {answer['prompt']!r} matches no "
                             f"line of {row[1]} in {os.path.join(mme_root, row[0])}")
        if row in prediction_by_row:
            raise ValueError(f"MME answers: question {answer['question_id']} {answer['prompt']!r} appears twice")
        prediction_by_row[row] = mme_prediction(answer['text'])
    image_rows = defaultdict(list)  # (subtask, txt_file) -> [(gold, prediction or None)]
    missing_ids = []
    for (subtask, txt_file, question), gold in truth.items():
        prediction = prediction_by_row.get((subtask, txt_file, question))
        if prediction is None:
            missing_ids.append(f"{subtask}/{txt_file[:-len('.txt')]}: {question}")
        image_rows[(subtask, txt_file)].append((gold, prediction))
    subtasks = {}
    for subtask in sorted({s for s, _ in image_rows}):
        images = [rows for (s, _), rows in image_rows.items() if s == subtask]
        answered = [(gold, pred) for rows in images for gold, pred in rows if pred is not None]
        complete_images = [rows for rows in images if all(pred is not None for _, pred in rows)]
        acc = percent(sum(gold == pred for gold, pred in answered), len(answered))
        acc_plus = percent(sum(all(gold == pred for gold, pred in rows) for rows in complete_images),
                           len(complete_images))
        subtasks[subtask] = dict(acc=acc, acc_plus=acc_plus,
                                 score=None if acc is None or acc_plus is None else acc + acc_plus,
                                 questions=len(answered), images=len(complete_images),
                                 other=sum(pred == 'other' for _, pred in answered))
    def total(names):
        scores = [subtasks[name]['score'] for name in names if name in subtasks and subtasks[name]['score'] is not None]
        return sum(scores) if scores else None
    return dict(perception=total(MME_PERCEPTION), cognition=total(MME_COGNITION), subtasks=subtasks,
                **missing_report('MME', missing_ids, len(truth)))

# -----------------------------------------------------------------------------
# answering: batched greedy decoding, sharded over torchrun ranks, resumable

@torch.no_grad()
def generate_answers(model, tokenizer, prompts, images, max_new_tokens, stats=None, expert_mask=None):
    """Greedy answers (stripped strings) to a batch of prompts (lists of token ids), left-padded for batched generation.
    images: one uint8 [3, S, S] per prompt holding the <image> placeholder, in batch order.
    stats: None, or a dict that gets the images' routing and HGA statistics (MoCHA.generate).
    expert_mask: MoVA only, [len(images), E] bool, the experts each image may use (None: all)."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else eos_id  # Phi-2's tokenizer has no pad token
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to left-pad prompts with")
    device = next(model.parameters()).device
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt):] = 1
    image_batch = torch.stack(images).to(device) if images else None  # (n_img, 3, S, S)
    new_ids = model.generate(input_ids.to(device), attention_mask.to(device), image_batch, max_new_tokens=max_new_tokens,
                             stats=stats, expert_mask=None if expert_mask is None else expert_mask.to(device))  # (B, T_new)
    answers = []
    for ids in new_ids.tolist():
        ends = [ids.index(t) for t in (eos_id, pad_id) if t is not None and t in ids]
        answers.append(tokenizer.decode(ids[:min(ends, default=len(ids))], skip_special_tokens=True).strip())
    return answers

def route_experts(model, tokenizer, texts, images, template):
    """MoVA's coarse routing, its first pass (the released model_vqa_loader.py): the LLM reads the routing prompt over
    each image, seen through the adapter with no expert, and answers with the experts' letters. Returns the expert
    masks [n_img, E] and the routing answers; an answer parse_routing cannot read uses every expert."""
    from mova import parse_routing, routing_question
    experts = model.mova_experts
    prompts = [data.build_prompt('<image>\n' + routing_question(text.replace('<image>', '').strip(), experts,
                                                                  model.config.mova_top_k), tokenizer, template)
               for text in texts]
    no_expert = torch.zeros(len(images), len(experts), dtype=torch.bool)
    answers = generate_answers(model, tokenizer, prompts, images, max_new_tokens=8, expert_mask=no_expert)
    masks, malformed = zip(*(parse_routing(answer, len(experts)) for answer in answers))
    return torch.stack(masks), answers, malformed


def oracle_routing(model, texts, probe):
    """The lab's oracle in place of the LLM's routing pass (towers.oracle_experts: per factor a question names, the
    expert the probe matrix reads it best with). The masks [n_img, E] and the choices as routing answers."""
    from mova import routing_answer
    from towers import oracle_experts
    experts = model.mova_experts
    masks = torch.tensor([[name in oracle_experts(text, probe, experts) for name in experts] for text in texts],
                         dtype=torch.bool).view(len(texts), len(experts))
    return masks, [routing_answer(mask) for mask in masks]


def image_path(question, image_folder, question_file):
    path = os.path.join(image_folder, question['image'])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{question_file}: question {question['question_id']}: image not found: {path}")
    return path

def answer_questions(model, tokenizer, question_file, image_folder, answers_file, template=None,
                     batch_size=8, max_new_tokens=128, image_size=None, model_id='nanomocha', routing=None,
                     weights=None, route='', probe=None):
    """Answer a LLaVA question jsonl ({question_id, image?, text}) into a LLaVA answers jsonl
    ({question_id, prompt, text, answer_id, model_id, metadata}), in question order.
    Resumable: questions already answered in answers_file (or in shard files left by an interrupted run)
    are skipped, and new answers are appended. Under torchrun each rank answers every world_size-th
    remaining batch into answers_file.rank{r}; after a barrier rank 0 appends them in question order
    and deletes the shards. Ranks share out whole batches, so every batch (its padding included) is the
    same for any number of ranks, and answer_id is the question's line index: runs with any number of
    ranks write the same file. template / image_size default to the model's config.
    routing: None, or expert_usage_sums(model), to which each batch's routing statistics are added.
    weights: what names the weights answering (checkpoint_stamp of their checkpoint), kept beside the answers in
    answers_file + '.weights': answers from other weights (a checkpoint retrained into the same out_dir) are
    renamed *.other and the questions answered again, never resumed. None: no check.
    route: MoVA models only. 'llm': MoVA's two passes, the LLM first picks each image's experts (route_experts),
    then answers with them; the routing answer goes into the record's metadata (experts), and one it cannot read is
    flagged there (malformed) and answered with every expert. 'oracle': the experts oracle_routing picks from the
    probe matrix `probe` ({tower: {factor: %}}, towers.py's probe.json). '': every expert. With 'llm' and a probe,
    the oracle's choice goes into the metadata too (oracle), to score the routing against.
    Returns how many questions this call answered (on all ranks together)."""
    template = template or model.config.template
    image_size = image_size or model.config.image_size
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    questions = read_jsonl(question_file)
    question_keys = list(index_by(questions, question_key, question_file))
    if rank == 0 and weights is not None:
        set_aside_answers_of_other_weights(answers_file, weights)
    barrier()
    done = set()
    for path in [answers_file] + answer_shards(answers_file):
        if os.path.exists(path):
            done |= {answer_key(a) for a in read_jsonl(path)}
    barrier()  # every rank has read the shards before any rank appends to its own
    todo = [(index, q) for index, (key, q) in enumerate(zip(question_keys, questions)) if key not in done]
    if rank == 0 and done:
        print(f"{answers_file}: resuming, {len(questions) - len(todo)} questions already answered, {len(todo)} to go")
    for _, question in todo:  # a missing image stops the run now, not hours into it
        if question.get('image'):
            image_path(question, image_folder, question_file)
    os.makedirs(os.path.dirname(answers_file) or '.', exist_ok=True)
    was_training = model.training
    model.eval()
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    with open(f'{answers_file}.rank{rank}', 'a') as shard:
        for batch in batches[rank::world_size]:
            prompts, images, image_texts = [], [], []
            for _, question in batch:
                text = question['text']
                if question.get('image'):  # LLaVA puts the image first: "<image>\n" + question
                    images.append(data.load_image(image_path(question, image_folder, question_file), image_size))
                    image_texts.append(text)
                    text = text if '<image>' in text else '<image>\n' + text
                prompts.append(data.build_prompt(text, tokenizer, template))
            expert_mask, routed = None, {}  # routed: question index -> its routing answer
            if route and images:
                with_image = [index for index, question in batch if question.get('image')]
                if route == 'oracle':
                    expert_mask, routing_answers = oracle_routing(model, image_texts, probe)
                    routed = {i: dict(experts=a) for i, a in zip(with_image, routing_answers)}
                else:
                    expert_mask, routing_answers, malformed = route_experts(model, tokenizer, image_texts, images,
                                                                            template)
                    oracle = oracle_routing(model, image_texts, probe)[1] if probe else [None] * len(images)
                    routed = {i: dict(experts=a, malformed=m, **({'oracle': o} if o else {}))
                              for i, a, m, o in zip(with_image, routing_answers, malformed, oracle)}
            stats = {} if routing is not None else None
            texts = generate_answers(model, tokenizer, prompts, images, max_new_tokens, stats, expert_mask)
            if stats:  # the generation's first forward: every image of the batch, routed once
                routing['sums'] += torch.stack([stats[name]['usage'].float().cpu() for name in model.moecs]) * len(images)
                routing['images'] += len(images)
            for (index, question), text in zip(batch, texts):
                record = dict(question_id=question['question_id'], prompt=question['text'], text=text,
                              answer_id=index, model_id=model_id, metadata=routed.get(index, {}))
                shard.write(json.dumps(record) + '\n')
            shard.flush()
    model.train(was_training)
    barrier()
    if rank == 0:
        merge_answer_shards(answers_file, question_keys)
    barrier()
    return len(todo)

def checkpoint_stamp(ckpt_dir):
    """Names one save of a checkpoint: its weights file's size and modification time (each save replaces the
    file, so it changes)."""
    info = os.stat(os.path.join(ckpt_dir, 'model.safetensors'))
    return f'{info.st_size}:{info.st_mtime_ns}'

def set_aside_answers_of_other_weights(answers_file, weights):
    """Rename answers_file and its shards to *.other when answers_file + '.weights' names other weights (or
    none), so that they are neither resumed nor lost; then record `weights` there."""
    stamp_file = answers_file + '.weights'
    answered = [p for p in [answers_file] + answer_shards(answers_file) if os.path.exists(p)]
    recorded = open(stamp_file).read() if os.path.exists(stamp_file) else None
    if answered and recorded != weights:
        print(f"{answers_file}: its answers are from other weights ({recorded or 'not recorded'}, now {weights}): "
              f"renamed *.other, answering afresh")
        for path in answered:  # a.jsonl -> a.jsonl.other, a.jsonl.rank0 -> a.jsonl.other.rank0 (no longer a shard)
            os.replace(path, answers_file + '.other' + path[len(answers_file):])
    os.makedirs(os.path.dirname(answers_file) or '.', exist_ok=True)
    with open(stamp_file, 'w') as f:
        f.write(weights)

def answer_shards(answers_file):
    return sorted(glob.glob(glob.escape(answers_file) + '.rank*'))

def merge_answer_shards(answers_file, question_keys):
    """Append the shards' answers that answers_file lacks, in question order; delete the shards."""
    done = {answer_key(a) for a in read_jsonl(answers_file)} if os.path.exists(answers_file) else set()
    new = {}
    for path in answer_shards(answers_file):
        new.update({answer_key(a): a for a in read_jsonl(path) if answer_key(a) not in done})
    order = {key: i for i, key in enumerate(question_keys)}
    with open(answers_file, 'a') as f:
        for key in sorted(new, key=lambda k: order.get(k, len(order))):
            f.write(json.dumps(new[key]) + '\n')
    for path in answer_shards(answers_file):
        os.remove(path)

# -----------------------------------------------------------------------------
# one benchmark end to end, the shapes benchmarks, the results table

# the files each benchmark needs: the questions and images to answer, then what its scorer reads
BENCHMARK_FILES = {
    'pope': ('question_file', 'image_folder', 'annotation_dir'),
    'gqa': ('question_file', 'image_folder', 'questions_json'),
    'gqa_words': ('question_file', 'image_folder', 'questions_json'),  # the shapes GQA in words, no image
    'mme': ('question_file', 'image_folder', 'mme_root'),
    'lab_pope': ('question_file', 'image_folder', 'annotation_dir'),  # the shapes lab's, scored as POPE and GQA
    'lab_gqa': ('question_file', 'image_folder', 'questions_json'),
}

def score_benchmark(benchmark, answers, files):
    """files: the benchmark's own files, the keys named like the scorers' arguments."""
    if benchmark in ('pope', 'lab_pope'):
        return score_pope(answers, files['question_file'], files['annotation_dir'])
    if benchmark in ('gqa', 'gqa_words', 'lab_gqa'):
        return score_gqa(answers, files['questions_json'])
    return score_mme(answers, files['mme_root'])

def expert_usage_sums(model):
    """What answer_questions adds up: per MoEC, each expert's share of the routed tokens times the images
    (None for a model without MoECs)."""
    if not getattr(model, 'moecs', None):
        return None
    num_experts = len(next(iter(model.moecs.values())).experts)
    return dict(sums=torch.zeros(len(model.moecs), num_experts), images=0)

def expert_usage(model, routing):
    """results.json's routing summary of a benchmark: per MoEC, the share of its routed tokens (top-k
    assignments) each expert got over the images answered in this run (a resumed run: the new ones only),
    summed over the ranks. Lets POPE's routing be compared with MME's, say."""
    if routing is None:
        return {}
    totals = torch.cat([routing['sums'].flatten(), torch.tensor([float(routing['images'])])])
    if dist.is_initialized():
        device = next(model.parameters()).device
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    images = int(totals[-1])
    shares = (totals[:-1] / max(images, 1)).view_as(routing['sums'])
    return dict(expert_usage={name: shares[i].tolist() for i, name in enumerate(model.moecs)} if images else None,
                expert_usage_images=images)

def routing_summary(answers, experts):
    """results.json's summary of MoVA's routing over a benchmark's answers: how many were routed, how many routing
    answers could not be read (and used every expert), each expert's share of the routed images, and, where the
    oracle's choice is known, how often the routing chose exactly its experts and, per expert, how often the two agree
    on using it (in %)."""
    from mova import parse_routing
    routed = [a['metadata'] for a in answers if 'experts' in a.get('metadata', {})]
    if not routed:
        return None
    masks = torch.stack([parse_routing(m['experts'], len(experts))[0] for m in routed]).float()
    summary = dict(answers=len(routed), malformed=sum(m.get('malformed', False) for m in routed),
                   expert_share={name: 100 * masks[:, e].mean().item() for e, name in enumerate(experts)},
                   no_expert=100 * (masks.sum(1) == 0).float().mean().item())
    if all('oracle' in m for m in routed):
        oracle = torch.stack([parse_routing(m['oracle'], len(experts))[0] for m in routed]).float()
        summary['matches_oracle'] = 100 * (masks == oracle).all(1).float().mean().item()
        summary['agrees_with_oracle'] = {name: 100 * (masks[:, e] == oracle[:, e]).float().mean().item()
                                         for e, name in enumerate(experts)}
    return summary


def run_benchmark(model, tokenizer, benchmark, files, out_dir, batch_size, max_new_tokens, model_id='nanomocha',
                  weights=None, route='', probe=None):
    """Answer files['question_file'] into out_dir/{benchmark}_answers.jsonl and score it (rank 0; None elsewhere)."""
    if benchmark not in BENCHMARK_FILES:
        raise ValueError(f"unknown benchmark {benchmark!r}, expected one of {sorted(BENCHMARK_FILES)} or 'shapes'")
    for name in BENCHMARK_FILES[benchmark]:  # check before hours of answering, not after
        if not files.get(name) or not os.path.exists(files[name]):
            raise FileNotFoundError(f"{benchmark}: {name} {files.get(name)!r} does not exist")
    answers_file = os.path.join(out_dir, f'{benchmark}_answers.jsonl')
    routing = expert_usage_sums(model)
    started = time.perf_counter()
    answered = answer_questions(model, tokenizer, files['question_file'], files['image_folder'], answers_file,
                                batch_size=batch_size, max_new_tokens=max_new_tokens, model_id=model_id,
                                routing=routing, weights=weights, route=route, probe=probe)
    seconds = time.perf_counter() - started
    usage = expert_usage(model, routing)  # every rank takes part in its all-reduce
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    answers = read_jsonl(answers_file)
    results = dict(score_benchmark(benchmark, answers, files), **usage)
    # wall time of this run's answering per question (batched, all ranks together); None when it answered none
    results['seconds_per_answer'] = seconds / answered if answered else None
    if route:
        results['mova_routing'] = dict(route=route, **(routing_summary(answers, model.mova_experts) or {}))
    if benchmark in ('gqa', 'lab_gqa'):  # the inputs of the official scorers, to check these numbers with them
        predictions_dir = out_dir if benchmark == 'gqa' else os.path.join(out_dir, 'lab')  # same file name
        os.makedirs(predictions_dir, exist_ok=True)
        write_gqa_predictions(answers, files['questions_json'], predictions_dir)
    elif benchmark == 'mme':
        write_mme_results(answers, files['mme_root'], out_dir)
    return results

# -----------------------------------------------------------------------------
# the official scorers' input files, written next to the answers (docs/evaluation.md, "Checking the numbers with the official scripts")

def write_gqa_predictions(answers, questions_json, out_dir):
    """GQA eval.py's predictions file, as LLaVA's convert_gqa_for_eval.py writes it: a JSON list of
    {questionId, prediction}, the prediction being score_gqa's (trailing '.' stripped, lower case). Named after
    the questions file: testdev_balanced_questions.json -> testdev_balanced_predictions.json (eval.py's
    '{tier}_predictions.json'). Returns its path."""
    tier = os.path.basename(questions_json).removesuffix('.json').removesuffix('_questions')
    path = os.path.join(out_dir, f'{tier}_predictions.json')
    with open(path, 'w') as f:
        json.dump([dict(questionId=str(a['question_id']), prediction=a['text'].rstrip('.').lower())
                   for a in answers], f)
    return path

def write_mme_results(answers, mme_root, out_dir):
    """MME calculation.py's input, as LLaVA's convert_answer_to_mme.py writes it: out_dir/mme_results/<subtask>.txt,
    one line 'image name<TAB>question<TAB>ground truth<TAB>answer' per question, an image's questions on
    consecutive lines in its table's order (calculation.py scores the lines two by two, one image per pair).
    Images with an unanswered question are left out, so no pair is split. Returns the folder
    (calculation.py --results_dir)."""
    truth = read_mme_ground_truth(mme_root)
    texts, image_names = {}, {}
    for answer in answers:
        row = mme_table_key(answer, truth)
        texts[row] = answer['text'].replace('\t', ' ').replace('\n', ' ')  # one answer, one line
        image_names[row[:2]] = str(answer['question_id']).split('#')[0].split('/')[-1]
    images = defaultdict(list)  # (subtask, txt_file) -> [(question, gold)], table order
    for (subtask, txt_file, question), gold in truth.items():
        images[subtask, txt_file].append((question, gold))
    lines = defaultdict(list)  # subtask -> lines
    for (subtask, txt_file), rows in images.items():
        if all((subtask, txt_file, question) in texts for question, _ in rows):
            image = image_names[subtask, txt_file]
            lines[subtask] += [f"{image}\t{question}\t{gold}\t{texts[subtask, txt_file, question]}\n"
                               for question, gold in rows]
    results_dir = os.path.join(out_dir, 'mme_results')
    os.makedirs(results_dir, exist_ok=True)
    for subtask, subtask_lines in lines.items():
        with open(os.path.join(results_dir, f'{subtask}.txt'), 'w') as f:
            f.writelines(subtask_lines)
    return results_dir

def pope_files(pope):
    return dict(question_file=os.path.join(pope, 'llava_pope_test.jsonl'), image_folder=os.path.join(pope, 'val2014'),
                annotation_dir=os.path.join(pope, 'coco'))

def gqa_files(gqa):
    return dict(question_file=os.path.join(gqa, 'llava_gqa_testdev_balanced.jsonl'),
                image_folder=os.path.join(gqa, 'images'),
                questions_json=os.path.join(gqa, 'testdev_balanced_questions.json'))

def shapes_files(shapes_dir):
    """Where shapes.prepare_shapes puts each shapes benchmark (LLaVA's playground/data/eval layout); the lab's
    POPE and GQA in the same layout under eval/lab."""
    eval_dir = os.path.join(shapes_dir, 'eval')
    pope, gqa, mme = (os.path.join(eval_dir, name) for name in ('pope', 'gqa', 'mme'))
    return {
        'pope': pope_files(pope),
        'gqa': gqa_files(gqa),
        'gqa_words': dict(question_file=os.path.join(gqa, 'llava_gqa_testdev_balanced_words.jsonl'),
                          image_folder=os.path.join(gqa, 'images'),  # unused: no question has an image
                          questions_json=os.path.join(gqa, 'testdev_balanced_questions.json')),
        'mme': dict(question_file=os.path.join(mme, 'llava_mme.jsonl'),
                    image_folder=os.path.join(mme, 'MME_Benchmark_release_version'),
                    mme_root=os.path.join(mme, 'MME_Benchmark_release_version')),
        'lab_pope': pope_files(os.path.join(eval_dir, 'lab', 'pope')),
        'lab_gqa': gqa_files(os.path.join(eval_dir, 'lab', 'gqa')),
    }

LAB_BENCHMARKS = ('lab_pope', 'lab_gqa')
SHAPES_BENCHMARKS = ('pope', 'gqa', 'mme') + LAB_BENCHMARKS  # the lab's only where the data has them

def evaluate_shapes(model, tokenizer, shapes_dir, out_dir, batch_size=64, max_new_tokens=16, model_id='nanomocha',
                    benchmarks=SHAPES_BENCHMARKS, weights=None, route='', probe=None):
    """Answer and score the shapes benchmarks (default: the three on images, and the lab's two where shapes_dir has
    them, eval/lab: a data dir of an older shapes.py has not; 'gqa_words' asks GQA's questions about the scenes
    written in words, which is how the text step is scored); answers and results.json go to out_dir.
    Resumable like answer_questions (weights: as there). batch_size 64: the tiny models of the shapes world answer
    in 14 % less time than in batches of 16, with the same answers (seed 0's checkpoint). Under torchrun every
    rank calls it with the unwrapped model (they share the answering).
    Returns {'pope': ..., 'gqa': ..., 'mme': ..., 'lab_pope': ..., 'lab_gqa': ...} on rank 0, None on the other
    ranks."""
    results = {}
    for benchmark in benchmarks:
        files = shapes_files(shapes_dir)[benchmark]
        if benchmark in LAB_BENCHMARKS and not os.path.exists(files['question_file']):
            continue
        results[benchmark] = run_benchmark(model, tokenizer, benchmark, files, out_dir, batch_size,
                                           max_new_tokens, model_id, weights, route, probe)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    write_results(results, out_dir)
    return results

def write_results(results, out_dir):
    print(results_table(results))
    path = os.path.join(out_dir, 'results.json')
    with open(path, 'w') as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")

def results_table(results):
    """The headline numbers, one line each (None: nothing answered)."""
    rows = []
    for benchmark, metrics in results.items():
        label = {'lab_pope': 'LAB POPE', 'lab_gqa': 'LAB GQA'}.get(benchmark, benchmark.upper())
        if benchmark in ('pope', 'lab_pope'):
            rows.append((label, 'F1 (mean of splits)', metrics['f1_avg']))
            for split in POPE_SPLITS:
                if split in metrics:
                    for name in ('accuracy', 'f1', 'yes_ratio'):
                        rows.append((label, f'{split} {name}', metrics[split][name]))
            for positives, group in metrics.get('by_positives', {}).items():
                rows.append((label, f'images of {positives} present: accuracy', group['accuracy']))
        elif benchmark in ('gqa', 'gqa_words', 'lab_gqa'):
            for name in ('accuracy', 'binary', 'open'):
                rows.append((label, name, metrics[name]))
            for kind, accuracy in sorted(metrics.get('by_type', {}).items()):
                rows.append((label, f'{kind} accuracy', accuracy))
        elif benchmark == 'mme':
            rows.append(('MME', 'perception', metrics['perception']))
            rows.append(('MME', 'cognition', metrics['cognition']))
            for subtask, sub in metrics['subtasks'].items():
                rows.append(('MME', f'{subtask} score', sub['score']))
        rows.append((label, 'unanswered questions', metrics['num_missing']))
        if metrics.get('seconds_per_answer') is not None:
            rows.append((label, 'ms per answer (this run)', 1000 * metrics['seconds_per_answer']))
        if metrics.get('mova_routing', {}).get('answers'):
            rows.append((label, f"routing ({metrics['mova_routing']['route']}): unreadable",
                         metrics['mova_routing']['malformed']))
            if 'matches_oracle' in metrics['mova_routing']:
                rows.append((label, 'routing: matches the oracle %', metrics['mova_routing']['matches_oracle']))
    lines = [f"{'benchmark':<10} {'metric':<28} {'value':>9}"]
    for benchmark, name, value in rows:
        shown = '-' if value is None else f'{value:9.2f}' if isinstance(value, float) else f'{value:9d}'
        lines.append(f"{benchmark:<10} {name:<28} {shown:>9}")
    return '\n'.join(lines)

# -----------------------------------------------------------------------------
# one image explained: which expert took each patch, and which patches HGA linked across encoders

def explain_answer(model, tokenizer, question, picture, path, max_new_tokens=128, num_edges=12):
    """Answers `question` about one image (uint8 [3, S, S]) and draws what the connectors did with it into the
    PNG `path`: one panel per MoEC with each patch tinted by its top-1 expert, then a panel with the
    num_edges strongest HGA inter-group edges (a line from a token's patch centre to its neighbour's, in
    the colours of their two encoders), the mean HGA gate in its title. Returns the answer."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    prompt = data.build_prompt('<image>\n' + question, tokenizer, model.config.template)
    stats = {}
    answer = generate_answers(model, tokenizer, [prompt], [picture], max_new_tokens, stats)[0]
    names, sizes, S = list(model.moecs), model.group_sizes, picture.shape[-1]
    num_experts = len(next(iter(model.moecs.values())).experts)
    expert_colours = plt.get_cmap('tab10').colors[:num_experts]
    group_colours = plt.get_cmap('Set1').colors
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 4.6), dpi=100)
    image = picture.permute(1, 2, 0).cpu().numpy()
    for ax, name in zip(axes, names):
        top1 = stats[name]['top1'][0].cpu()                                  # [N_g], expert of each patch
        side = math.isqrt(top1.numel())
        ax.imshow(image)
        ax.imshow(top1.view(side, side).numpy(), cmap=matplotlib.colors.ListedColormap(expert_colours),
                  vmin=-0.5, vmax=num_experts - 0.5, alpha=0.5, extent=(-0.5, S - 0.5, S - 0.5, -0.5), interpolation='nearest')
        ax.set_title(f'{name}: top-1 expert')
    axes[0].legend(handles=[Patch(color=c, label=f'expert {e}') for e, c in enumerate(expert_colours)],
                   loc='lower left', fontsize='x-small')
    ax = axes[-1]
    ax.imshow(image)
    if 'hga' in stats:
        # token -> (its group, the centre of its patch in image pixels), each group's grid stretched over the image
        offsets = [sum(sizes[:g]) for g in range(len(sizes))]
        def where(token):
            g = max(i for i, offset in enumerate(offsets) if offset <= token)
            side = math.isqrt(sizes[g])
            row, col = divmod(token - offsets[g], side)
            return g, ((col + 0.5) * S / side - 0.5, (row + 0.5) * S / side - 0.5)  # imshow's pixel centres
        weights = stats['hga']['inter_edge_weights'][0].cpu()                  # [N, k_inter], 0 where not kept
        targets = stats['hga']['inter_edge_targets'][0].cpu()
        strongest = weights.flatten().topk(min(num_edges, weights.numel()))
        for weight, flat in zip(strongest.values.tolist(), strongest.indices.tolist()):
            if weight <= 0:
                break
            (g_src, (x0, y0)), (g_dst, (x1, y1)) = where(flat // weights.shape[1]), where(int(targets.flatten()[flat]))
            ax.plot([x0, x1], [y0, y1], '-', color=group_colours[g_dst], lw=0.5 + 2.5 * weight, alpha=0.8)
            ax.plot([x0], [y0], 'o', color=group_colours[g_src], ms=5)
        ax.legend(handles=[Patch(color=group_colours[g], label=n) for g, n in enumerate(names)],
                  loc='lower left', fontsize='x-small', title='dot: from, line: to', title_fontsize='x-small')
        ax.set_title(f"HGA inter-group edges, mean gate {stats['hga']['gate'].item():.2f}")
    else:
        ax.set_title('HGA off')
    for ax in axes:
        ax.axis('off')
    fig.suptitle(f'Q: {question}   A: {answer}', fontsize='medium')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return answer

# -----------------------------------------------------------------------------
# the command line (nanoGPT style: module globals, overridden by config/eval_*.py and --key=value)

if __name__ == '__main__':
    # checkpoint and output
    ckpt_dir = 'out/shapes/ckpt'  # a MoCHA.save_pretrained directory (train.py writes out_dir/ckpt)
    out_dir = ''  # answers + results.json; '' means {ckpt_dir}/eval_{benchmark}
    # what to evaluate
    benchmark = 'shapes'  # 'shapes' (the shapes benchmarks) | 'pope' | 'gqa' | 'mme'
    shapes_dir = 'data/shapes'  # written by `python shapes.py`
    shapes_benchmarks = ','.join(SHAPES_BENCHMARKS)  # benchmark='shapes' runs these; also 'gqa_words' (the text step's)
    question_file = ''  # a LLaVA question jsonl (real benchmarks; see config/eval_*.py)
    image_folder = ''
    annotation_dir = ''  # POPE: the folder of coco_pope_{random,popular,adversarial}.json
    questions_json = ''  # GQA: testdev_balanced_questions.json
    mme_root = ''  # MME: MME_Benchmark_release_version
    # single-image mode: print the answer to one question about one image
    image = ''
    question = 'What is in the image?'
    explain = ''  # a PNG path: also draw each patch's top-1 expert per encoder and HGA's strongest cross-encoder edges
    template = ''  # '' = the template the checkpoint was trained with (its config.json); set only to compare
    # decoding
    batch_size = 16
    max_new_tokens = 128  # LLaVA's default; benchmark answers are a word or two
    route = ''  # MoVA checkpoints: '' every expert; 'llm' its two passes, the LLM picking each image's experts first;
                # 'oracle' the experts the lab's probe matrix says carry what the question names (towers.py)
    probe_json = 'weights/towers/probe.json'  # shapes: the probe matrix, the oracle and what 'llm' routing is scored against
    # system
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
    exec(open('configurator.py').read())  # overrides from the command line or a config file
    # -----------------------------------------------------------------------------
    from mocha import MoCHA  # imported here so that train.py and the tests can import the scorers cheaply

    ddp = int(os.environ.get('RANK', -1)) != -1  # launched by torchrun
    if ddp:
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        if device.startswith('cuda'):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    master_process = not ddp or dist.get_rank() == 0
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

    model = MoCHA.from_pretrained(ckpt_dir).to(device)
    model.eval()
    if route not in ('', 'llm', 'oracle'):
        raise ValueError(f"route must be '', 'llm' or 'oracle', got {route!r}")
    if route and model.config.connector != 'mova':
        raise ValueError(f"route={route} is MoVA's routing, and {ckpt_dir} is a MoCHA checkpoint (connector "
                         f"{model.config.connector!r})")
    tokenizer = model.tokenizer  # saved in the checkpoint: the one the model was trained with
    if template and template != model.config.template:
        print(f"WARNING: {ckpt_dir} was trained with the {model.config.template!r} template; prompting it with "
              f"{template!r} instead gives it prompts it has never seen")
        model.config.template = template
    probe = None  # the lab's towers' matrix: it knows the shapes world's questions and towers, no real benchmark's
    if route and benchmark == 'shapes' and os.path.exists(probe_json):
        with open(probe_json) as f:
            probe = json.load(f)
    elif route == 'oracle':
        raise ValueError(f"route=oracle routes the shapes world's questions by the lab's probe matrix ({probe_json}, "
                         f"`python towers.py --probe=True`): benchmark=shapes only")
    model_id = os.path.basename(os.path.normpath(ckpt_dir))
    out_dir = out_dir or os.path.join(ckpt_dir, f'eval_{benchmark}' + (f'_{route}' if route else ''))

    with ctx:
        if image:
            if master_process:
                picture = data.load_image(image, model.config.image_size)
                if explain:
                    print(explain_answer(model, tokenizer, question, picture, explain, max_new_tokens))
                    print(f"wrote {explain}")
                else:
                    prompt = data.build_prompt('<image>\n' + question, tokenizer, model.config.template)
                    print(generate_answers(model, tokenizer, [prompt], [picture], max_new_tokens)[0])
        elif benchmark == 'shapes':
            evaluate_shapes(model, tokenizer, shapes_dir, out_dir, batch_size, max_new_tokens, model_id,
                            shapes_benchmarks.split(','), checkpoint_stamp(ckpt_dir), route, probe)
        else:
            files = dict(question_file=question_file, image_folder=image_folder, annotation_dir=annotation_dir,
                         questions_json=questions_json, mme_root=mme_root)
            results = {benchmark: run_benchmark(model, tokenizer, benchmark, files, out_dir, batch_size,
                                                max_new_tokens, model_id, checkpoint_stamp(ckpt_dir), route,
                                                probe)}
            if master_process:
                write_results(results, out_dir)
    if ddp:
        dist.destroy_process_group()
