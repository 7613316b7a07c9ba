"""
Tests of eval.py: the POPE / GQA / MME scorers on small hand-made benchmark files whose numbers are
worked out by hand in the comments, and the answering loop (left padding, image order, resuming,
sharding over two gloo ranks, the shapes pipeline down to results.json).

The answering tests use FakeMoCHA, a stand-in with the mocha.MoCHA interface of CONTRACT.md
(`.config.template`, `.config.image_size`, `generate(input_ids, attention_mask, images, max_new_tokens)`)
that answers 'yes' for a bright image, 'no' for a dark one and 'maybe' without one, so that the tests
need neither the model code nor weights. The end-to-end test with the real tiny MoCHA lives with the model.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import eval as ev

IMAGE_TOKEN_ID = -200  # CONTRACT.md: the <image> placeholder id inside input_ids

def write_jsonl(path, records):
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)

def answer(question_id, text, prompt=''):
    return dict(question_id=question_id, prompt=prompt, text=text, answer_id=0, model_id='test', metadata={})

# -----------------------------------------------------------------------------
# parsing rules

def test_pope_prediction_follows_the_official_first_sentence_word_rule():
    cases = {
        "No, there is not.": 'no',
        "Yes.": 'yes',
        "yes, it is": 'yes',
        "NO": 'yes',  # only 'No', 'not', 'no' count, so upper-case NO reads as yes
        "There is no dog": 'no',
        "not sure": 'no',
        "": 'yes',
        "Yes. There is no cat.": 'yes',  # only the first sentence counts
        "No.": 'no',
        "No\nthere is": 'yes',  # words are split on spaces only: 'No\nthere' is one word
        "Nothing here": 'yes',
    }
    assert {text: ev.pope_prediction(text) for text in cases} == cases

def test_mme_prediction_follows_calculation_py():
    cases = {
        "yes": 'yes', "NO": 'no', "Yes.": 'yes', "No, there is not.": 'no', "yes, it is": 'yes',
        "not sure": 'no',  # 'no' is in the first four characters
        "There is no dog": 'other', "": 'other', "I don't know": 'other', "Maybe": 'other',
        "Yes. There is no cat.": 'yes', "none": 'no',
    }
    assert {text: ev.mme_prediction(text) for text in cases} == cases

# -----------------------------------------------------------------------------
# POPE

def make_pope(tmp_path):
    """Two splits (no adversarial file). The question ids are LLaVA-style and unlike the annotation
    files' own ids; the splits' questions are interleaved in the question file."""
    random_rows = [  # (answer text, label): outcome
        ("No, there is not.", 'no'),       # TN
        ("Yes.", 'yes'),                   # TP
        ("yes, it is", 'no'),              # FP
        ("NO", 'no'),                      # FP (parses as yes)
        ("There is no dog", 'yes'),        # FN
        ("not sure", 'no'),                # TN
        ("", 'yes'),                       # TP (parses as yes)
        ("Yes. There is no cat.", 'yes'),  # TP
        ("No", 'yes'),                     # FN
        (None, 'yes'),                     # no answer: reported, not scored
    ]
    popular_rows = [("Yes", 'yes'), ("no", 'no'), ("yes", 'yes'), ("No.", 'yes')]  # TP TN TP FN
    questions, answers, labels = {'random': [], 'popular': []}, [], {'random': [], 'popular': []}
    for split, rows, base in (('random', random_rows, 30000000), ('popular', popular_rows, 20000000)):
        for i, (text, label) in enumerate(rows, 1):
            image = f'COCO_val2014_{split}_{i}.jpg'
            questions[split].append(dict(question_id=base + i, image=image, category=split,
                                         text=f"Is there a thing {i}?\nAnswer the question using a single word or phrase."))
            labels[split].append(dict(question_id=i, image=image, text=f"Is there a thing {i}?", label=label))
            if text is not None:
                answers.append(answer(base + i, text))
    # interleave the splits: r1 p1 r2 p2 r3 p3 r4 p4 r5 ... r10
    questions = [q for pair in zip(questions['random'], questions['popular']) for q in pair] + questions['random'][4:]
    write_jsonl(tmp_path / 'llava_pope_test.jsonl', questions)
    os.makedirs(tmp_path / 'coco')
    for split, rows in labels.items():
        write_jsonl(tmp_path / 'coco' / f'coco_pope_{split}.json', rows)
    return answers[::-1]  # answers in any order

def test_score_pope_hand_computed(tmp_path):
    answers = make_pope(tmp_path)
    result = ev.score_pope(answers, tmp_path / 'llava_pope_test.jsonl', tmp_path / 'coco')
    # random: TP 3, FP 2, TN 2, FN 2 over 9 answered questions
    r = result['random']
    assert (r['tp'], r['fp'], r['tn'], r['fn'], r['questions']) == (3, 2, 2, 2, 9)
    assert r['accuracy'] == pytest.approx(100 * 5 / 9)
    assert r['precision'] == pytest.approx(60.0) and r['recall'] == pytest.approx(60.0)
    assert r['f1'] == pytest.approx(60.0)
    assert r['yes_ratio'] == pytest.approx(100 * 5 / 9)
    # popular: TP 2, TN 1, FN 1: precision 100, recall 2/3, F1 = 2*100*66.7/166.7 = 80
    p = result['popular']
    assert (p['tp'], p['fp'], p['tn'], p['fn']) == (2, 0, 1, 1)
    assert p['accuracy'] == pytest.approx(75.0) and p['yes_ratio'] == pytest.approx(50.0)
    assert p['recall'] == pytest.approx(200 / 3) and p['f1'] == pytest.approx(80.0)
    assert 'adversarial' not in result
    assert result['f1_avg'] == pytest.approx(70.0)
    assert result['num_missing'] == 1 and result['missing_ids'] == [30000010]

def test_score_pope_refuses_mismatched_files(tmp_path):
    answers = make_pope(tmp_path)
    with pytest.raises(ValueError, match='not in'):
        ev.score_pope(answers + [answer(999, 'yes')], tmp_path / 'llava_pope_test.jsonl', tmp_path / 'coco')
    labels = ev.read_jsonl(tmp_path / 'coco' / 'coco_pope_popular.json')
    labels[1]['image'] = 'another.jpg'
    write_jsonl(tmp_path / 'coco' / 'coco_pope_popular.json', labels)
    with pytest.raises(ValueError, match=r'coco_pope_popular.json:2: label is for image another.jpg'):
        ev.score_pope(answers, tmp_path / 'llava_pope_test.jsonl', tmp_path / 'coco')
    write_jsonl(tmp_path / 'coco' / 'coco_pope_popular.json', labels[:3])
    with pytest.raises(ValueError, match='has 3 labels but .* has 4 questions'):
        ev.score_pope(answers, tmp_path / 'llava_pope_test.jsonl', tmp_path / 'coco')

# -----------------------------------------------------------------------------
# GQA

def test_score_gqa_hand_computed(tmp_path):
    def q(answer_, structural, balanced=True):
        return dict(imageId='n1', question='?', answer=answer_, isBalanced=balanced,
                    types=dict(structural=structural, semantic='attr', detailed='x'))
    questions = {'201': q('yes', 'verify'), '202': q('no', 'logical'), '203': q('red', 'query'),
                 '204': q('left', 'query'), '205': q('yes', 'compare'), '206': q('cat', 'choose'),
                 '207': q('dog', 'query', balanced=False), '208': q('dog', 'query')}
    with open(tmp_path / 'testdev_balanced_questions.json', 'w') as f:
        json.dump(questions, f)
    answers = [answer('201', 'Yes.'),               # 'yes'  right, binary
               answer('202', 'No, there is not.'),  # 'no, there is not' wrong, binary
               answer('203', 'Red.'),               # 'red' right, open
               answer('204', 'left..'),             # every trailing '.' goes: right, open
               answer('205', 'yes, it is'),         # wrong, binary
               answer('207', 'dog'),                # not balanced: not scored
               answer('208', '')]                   # wrong, open; 206 has no answer
    result = ev.score_gqa(answers, tmp_path / 'testdev_balanced_questions.json')
    assert result['questions'] == 6
    assert result['accuracy'] == pytest.approx(50.0)      # 3 of 6
    assert result['binary'] == pytest.approx(100 / 3)     # 201 of 201, 202, 205
    assert result['open'] == pytest.approx(200 / 3)       # 203, 204 of 203, 204, 208
    assert result['num_missing'] == 1 and result['missing_ids'] == ['206']
    with pytest.raises(ValueError, match='appears twice'):
        ev.score_gqa(answers + [answer('201', 'no')], tmp_path / 'testdev_balanced_questions.json')

# -----------------------------------------------------------------------------
# MME

def make_mme(root):
    """existence: images and tables side by side; artwork: images/ + questions_answers_YN/;
    code_reasoning: one question with two spaces before 'Please answer yes or no.', as in the release.
    The question files' two styles: existence and code_reasoning as LLaVA's llava_mme.jsonl (question id
    '<subtask>/<image>', MME's suffix swapped for the short-answer line), artwork as data.py's shapes
    MME (question id '<subtask>/images/<image>#k', MME's own suffix kept)."""
    tables = {
        ('existence', '', 'a'): [("Is there a dog in this image? Please answer yes or no.", 'Yes'),
                                 ("Is there a cat in this image? Please answer yes or no.", 'No')],
        ('existence', '', 'b'): [("Is there a bus in this image? Please answer yes or no.", 'Yes'),
                                 ("Is there a car in this image? Please answer yes or no.", 'No')],
        ('artwork', 'questions_answers_YN', 'c'): [("Is this by Monet? Please answer yes or no.", 'Yes'),
                                                   ("Is this by Dali? Please answer yes or no.", 'No')],
        ('artwork', 'questions_answers_YN', 'd'): [("Is this a fresco? Please answer yes or no.", 'Yes'),
                                                   ("Is this a mosaic? Please answer yes or no.", 'No')],
        ('code_reasoning', '', 'e'): [("Does the code print 3?  Please answer yes or no.", 'Yes'),
                                      ("Does the code print 4? Please answer yes or no.", 'No')],
    }
    questions = []
    for (subtask, table_dir, name), rows in tables.items():
        image_dir = os.path.join(root, subtask, 'images' if table_dir else '')
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(os.path.join(root, subtask, table_dir), exist_ok=True)
        Image.new('RGB', (8, 8), (255, 255, 255) if name in 'ace' else (0, 0, 0)).save(os.path.join(image_dir, f'{name}.png'))
        with open(os.path.join(root, subtask, table_dir, f'{name}.txt'), 'w') as f:
            f.writelines(f"{question}\t{gold}\n" for question, gold in rows)
        image = os.path.join(subtask, 'images' if table_dir else '', f'{name}.png')
        for k, (question, _) in enumerate(rows):
            if subtask == 'artwork':
                question_id, text = f'{image}#{k}', question
            else:
                question_id = f'{subtask}/{name}.png'
                text = question.replace('  Please answer yes or no.', ' Please answer yes or no.')
                text = text.replace(' Please answer yes or no.', '\nAnswer the question using a single word or phrase.')
            questions.append(dict(question_id=question_id, text=text, category=subtask, image=image))
    return questions

def test_score_mme_hand_computed_on_both_layouts(tmp_path):
    questions = make_mme(tmp_path / 'MME')
    texts = ["Yes.", "not sure",                          # a: yes right, no right -> image right
             "There is no dog", "NO",                     # b: other wrong, no right
             "", "No, there is not.",                     # c: other wrong, no right
             "yes, it is", None,                          # d: yes right, no answer
             "Yes. There is no cat.", "I don't know"]     # e: yes right, other wrong
    answers = [answer(q['question_id'], text, prompt=q['text']) for q, text in zip(questions, texts) if text is not None]
    result = ev.score_mme(answers, tmp_path / 'MME')
    existence, artwork, code = (result['subtasks'][s] for s in ('existence', 'artwork', 'code_reasoning'))
    # existence: acc 3/4, acc+ 1/2 -> 75 + 50
    assert (existence['acc'], existence['acc_plus'], existence['score']) == pytest.approx((75.0, 50.0, 125.0))
    assert (existence['questions'], existence['images'], existence['other']) == (4, 2, 1)
    # artwork: acc 2/3 over answered questions; acc+ over the one fully answered image (c, wrong) = 0
    assert (artwork['acc'], artwork['acc_plus'], artwork['score']) == pytest.approx((200 / 3, 0.0, 200 / 3))
    assert (artwork['questions'], artwork['images'], artwork['other']) == (3, 1, 1)
    # code_reasoning: acc 1/2, acc+ 0
    assert (code['acc'], code['acc_plus'], code['score']) == pytest.approx((50.0, 0.0, 50.0))
    assert result['perception'] == pytest.approx(125.0 + 200 / 3)
    assert result['cognition'] == pytest.approx(50.0)
    assert result['num_missing'] == 1
    assert result['missing_ids'] == ['artwork/d: Is this a mosaic? Please answer yes or no.']

def test_score_mme_bad_input_names_the_place(tmp_path):
    questions = make_mme(tmp_path / 'MME')
    with pytest.raises(ValueError, match='matches no line of a.txt'):
        ev.score_mme([answer(questions[0]['question_id'], 'yes', prompt='Is there a unicorn?')], tmp_path / 'MME')
    with open(tmp_path / 'MME' / 'existence' / 'a.txt', 'a') as f:
        f.write("A question without an answer\n")
    with pytest.raises(ValueError, match=r'a.txt:3: expected'):
        ev.score_mme([], tmp_path / 'MME')

# -----------------------------------------------------------------------------
# bad files

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / 'answers.jsonl'
    path.write_text('{"question_id": 1, "text": "yes"}\n\n{"question_id": 2, "text": "no"\n')
    with pytest.raises(ValueError, match=r'answers.jsonl:3: not valid JSON'):
        ev.read_jsonl(path)

# -----------------------------------------------------------------------------
# answering, with a stand-in model

def make_tokenizer():
    """A word-level tokenizer built in memory (the tests download nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(['<|endoftext|>', '[UNK]', 'yes', 'no', 'maybe', 'USER:', 'ASSISTANT:'])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='<|endoftext|>', unk_token='[UNK]')

class FakeMoCHA(torch.nn.Module):
    """mocha.MoCHA's generate interface: 'yes' for a bright image, 'no' for a dark one, 'maybe' without."""
    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.config = SimpleNamespace(template='phi', image_size=8)
        self.word_ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ('yes', 'no', 'maybe')}
        self.eos_id = tokenizer.eos_token_id
        self.rows_answered = 0

    def generate(self, input_ids, attention_mask, images, max_new_tokens):
        assert not self.training
        for mask in attention_mask:  # left padding: 0..0 1..1
            assert torch.equal(mask, torch.sort(mask).values) and mask[-1] == 1
        has_image = (input_ids == IMAGE_TOKEN_ID).sum(1)
        assert has_image.max() <= 1
        assert (images is None and has_image.sum() == 0) or len(images) == has_image.sum()
        image_rows = iter(images if images is not None else [])
        new_ids = []
        for row_has_image in has_image:
            word = ('yes' if next(image_rows).float().mean() > 127 else 'no') if row_has_image else 'maybe'
            new_ids.append([self.word_ids[word]] + [self.eos_id] * (max_new_tokens - 1))
        self.rows_answered += len(new_ids)
        return torch.tensor(new_ids)

def make_questions(tmp_path, count=7):
    """Questions alternating bright/dark images, every third one without an image."""
    os.makedirs(tmp_path / 'images', exist_ok=True)
    Image.new('RGB', (10, 6), (250, 250, 250)).save(tmp_path / 'images' / 'bright.png')
    Image.new('RGB', (6, 10), (5, 5, 5)).save(tmp_path / 'images' / 'dark.png')
    questions, expected = [], []
    for i in range(count):
        q = dict(question_id=f'q{i}', text=f'Is it bright {i}?' + ' padding' * i, category='test')
        if i % 3 == 2:
            expected.append('maybe')
        else:
            q['image'] = 'bright.png' if i % 2 == 0 else 'dark.png'
            expected.append('yes' if i % 2 == 0 else 'no')
        questions.append(q)
    write_jsonl(tmp_path / 'questions.jsonl', questions)
    return questions, expected

def test_answer_questions_writes_llava_answers_in_question_order(tmp_path):
    questions, expected = make_questions(tmp_path)
    tokenizer = make_tokenizer()
    model = FakeMoCHA(tokenizer)
    answers_file = str(tmp_path / 'out' / 'answers.jsonl')
    ev.answer_questions(model, tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images', answers_file,
                        batch_size=3, max_new_tokens=4, model_id='fake')
    answers = ev.read_jsonl(answers_file)
    assert [a['text'] for a in answers] == expected
    assert [a['question_id'] for a in answers] == [q['question_id'] for q in questions]
    assert answers[0] == dict(question_id='q0', prompt='Is it bright 0?', text='yes', answer_id=0,
                              model_id='fake', metadata={})
    assert model.training and os.listdir(tmp_path / 'out') == ['answers.jsonl']  # mode restored, shards merged

def test_answer_questions_resumes_without_redoing_answers(tmp_path):
    questions, expected = make_questions(tmp_path)
    tokenizer = make_tokenizer()
    model = FakeMoCHA(tokenizer)
    answers_file = tmp_path / 'answers.jsonl'
    old = [answer(questions[i]['question_id'], 'old', prompt=questions[i]['text']) for i in (1, 4)]
    write_jsonl(answers_file, old)
    ev.answer_questions(model, tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images', str(answers_file),
                        batch_size=2, max_new_tokens=3)
    answers = ev.read_jsonl(answers_file)
    assert model.rows_answered == len(questions) - 2
    assert answers[:2] == old  # appended to, not overwritten
    assert [a['question_id'] for a in answers[2:]] == ['q0', 'q2', 'q3', 'q5', 'q6']
    assert [a['text'] for a in answers[2:]] == [expected[i] for i in (0, 2, 3, 5, 6)]
    ev.answer_questions(model, tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images', str(answers_file))
    assert model.rows_answered == len(questions) - 2 and len(ev.read_jsonl(answers_file)) == len(questions)

def test_missing_image_names_question_and_path(tmp_path):
    write_jsonl(tmp_path / 'questions.jsonl', [dict(question_id=17, image='gone.png', text='What?')])
    tokenizer = make_tokenizer()
    with pytest.raises(FileNotFoundError, match=r'question 17: image not found: .*gone.png'):
        ev.answer_questions(FakeMoCHA(tokenizer), tokenizer, tmp_path / 'questions.jsonl', tmp_path,
                            str(tmp_path / 'answers.jsonl'))

def answer_on_rank(rank, tmp_path, answers_file):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=rank, world_size=2)
    tokenizer = make_tokenizer()
    ev.answer_questions(FakeMoCHA(tokenizer), tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images',
                        answers_file, batch_size=2, max_new_tokens=3)
    dist.destroy_process_group()

def test_two_ranks_write_the_same_answers_file_as_one(tmp_path):
    make_questions(tmp_path)
    tokenizer = make_tokenizer()
    ev.answer_questions(FakeMoCHA(tokenizer), tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images',
                        str(tmp_path / 'one.jsonl'), batch_size=2, max_new_tokens=3)
    mp.spawn(answer_on_rank, args=(tmp_path, str(tmp_path / 'two.jsonl')), nprocs=2)
    assert (tmp_path / 'two.jsonl').read_text() == (tmp_path / 'one.jsonl').read_text()
    assert not [name for name in os.listdir(tmp_path) if '.rank' in name]

def test_evaluate_shapes_writes_results_json_with_all_three_scores(tmp_path):
    """The shapes layout of ev.shapes_files, filled with a tiny hand-made benchmark of each kind."""
    files = ev.shapes_files(str(tmp_path / 'shapes'))
    # POPE: bright images have the object
    os.makedirs(files['pope']['image_folder']), os.makedirs(files['pope']['annotation_dir'])
    Image.new('RGB', (8, 8), (255, 255, 255)).save(os.path.join(files['pope']['image_folder'], 'bright.png'))
    Image.new('RGB', (8, 8), (0, 0, 0)).save(os.path.join(files['pope']['image_folder'], 'dark.png'))
    pope_questions = [dict(question_id=i, image=image, text='Is there a circle?', category=split)
                      for i, (split, image) in enumerate([(s, im) for s in ev.POPE_SPLITS for im in ('bright.png', 'dark.png')])]
    write_jsonl(files['pope']['question_file'], pope_questions)
    for split in ev.POPE_SPLITS:
        write_jsonl(os.path.join(files['pope']['annotation_dir'], f'coco_pope_{split}.json'),
                    [dict(image='bright.png', label='yes'), dict(image='dark.png', label='yes')])
    # GQA: one binary question the fake gets right, one open question it gets wrong
    os.makedirs(files['gqa']['image_folder'])
    Image.new('RGB', (8, 8), (255, 255, 255)).save(os.path.join(files['gqa']['image_folder'], 'g.png'))
    write_jsonl(files['gqa']['question_file'], [dict(question_id='1', image='g.png', text='Is it white?'),
                                                dict(question_id='2', image='g.png', text='What colour?')])
    with open(files['gqa']['questions_json'], 'w') as f:
        json.dump({'1': dict(answer='yes', types=dict(structural='verify')),
                   '2': dict(answer='white', types=dict(structural='query'))}, f)
    # MME: existence / artwork / code_reasoning as in the MME scorer test
    write_jsonl(files['mme']['question_file'], make_mme(files['mme']['mme_root']))
    tokenizer = make_tokenizer()
    results = ev.evaluate_shapes(FakeMoCHA(tokenizer), tokenizer, str(tmp_path / 'shapes'), str(tmp_path / 'out'),
                                 batch_size=4, max_new_tokens=2)
    with open(tmp_path / 'out' / 'results.json') as f:
        assert json.load(f) == results
    # POPE per split: bright -> yes (TP), dark -> no (FN): precision 100, recall 50, F1 66.7
    assert results['pope']['f1_avg'] == pytest.approx(200 / 3) and results['pope']['num_missing'] == 0
    assert (results['gqa']['accuracy'], results['gqa']['binary'], results['gqa']['open']) == (50.0, 100.0, 0.0)
    # MME: the fake says yes to bright images (a, c, e), no to dark ones (b, d): every question of
    # a/c/e with gold 'no' and every b/d question with gold 'yes' is wrong -> acc 50, acc+ 0 everywhere
    assert results['mme']['perception'] == pytest.approx(100.0) and results['mme']['cognition'] == pytest.approx(50.0)
    assert sorted(os.listdir(tmp_path / 'out')) == ['gqa_answers.jsonl', 'mme_answers.jsonl',
                                                    'pope_answers.jsonl', 'results.json']
