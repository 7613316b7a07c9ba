"""
Tests for data.py: templates and label masks on three local tokenizers (word-level, GPT-2-like byte-level
BPE, Llama-like SentencePiece BPE), bad samples, truncation, collate, images, the shapes world.
Run: HF_HUB_OFFLINE=1 python -m pytest -q test_data.py
"""
import copy
import filecmp
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import data
from data import IGNORE_INDEX, IMAGE_TOKEN_ID, SYSTEM

CORPUS = [SYSTEM, "USER: What color is the circle? ASSISTANT: red", "How many squares are there? 2",
          "Is there a blue triangle in the image? Yes No", "a large red circle at the top left and a small square"] * 10
TWO_TURNS = [{'from': 'human', 'value': '<image>\nWhat color is the circle?'}, {'from': 'gpt', 'value': 'red'},
             {'from': 'human', 'value': 'How many squares are there?'}, {'from': 'gpt', 'value': '2'}]
CAPTION = [{'from': 'human', 'value': 'Describe the image briefly.\n<image>'},
           {'from': 'gpt', 'value': 'a large red circle at the top left'}]


@pytest.fixture(scope='module')
def word_tokenizer():
    return data.build_word_tokenizer(CORPUS + ['Describe the image briefly.'])


@pytest.fixture(scope='module')
def bpe_tokenizer():
    """GPT-2 / Phi-2 style: byte-level BPE, spaces belong to the next token, no bos."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token='<|endoftext|>')


@pytest.fixture(scope='module')
def sp_tokenizer():
    """Llama / Vicuna style, built like transformers v5's LlamaTokenizer: BPE with byte fallback,
    Metaspace '▁' dummy prefix on the first section, <s> added in front of every text."""
    tokenizer = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first', split=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<unk>', '<s>', '</s>'])
    tokenizer.train_from_iterator(CORPUS, trainer)
    # add the 256 byte tokens; the corpus has no newline, so '\n' falls back to <0x0A> as in Llama
    model = json.loads(tokenizer.to_str())['model']
    vocab = dict(model['vocab'], **{f'<0x{i:02X}>': len(model['vocab']) + i for i in range(256)})
    tokenizer.model = models.BPE(vocab, [tuple(merge) for merge in model['merges']], unk_token='<unk>',
                                 byte_fallback=True, fuse_unk=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first', split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=' ', left=1)])
    tokenizer.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token='<s>', eos_token='</s>', unk_token='<unk>')


def reference_encoding(conversations, tokenizer, template):
    """The independent way: join the whole conversation into one string, encode it once with '<image>'
    as a special token, and mark learned tokens by their character offsets."""
    eos = tokenizer.eos_token
    if template == 'plain':
        text, learned_spans = '<image>' + conversations[1]['value'] + '\n', [(7, None)]
    else:
        text, learned_spans = SYSTEM + ' ', []
        for human, gpt in zip(conversations[0::2], conversations[1::2]):
            text += f"USER: {human['value']} ASSISTANT:"
            start = len(text)
            text += ' ' + gpt['value'] + eos
            learned_spans.append((start, len(text)))
    learned_spans = [(start, end or len(text)) for start, end in learned_spans]
    oracle = copy.deepcopy(tokenizer)
    oracle.add_special_tokens({'additional_special_tokens': ['<image>']})
    encoding = oracle(text, return_offsets_mapping=True)
    image_id = oracle.convert_tokens_to_ids('<image>')
    input_ids = [IMAGE_TOKEN_ID if i == image_id else i for i in encoding['input_ids']]
    labels = [i if end > start and any(s <= start and end <= e for s, e in learned_spans) else IGNORE_INDEX
              for i, (start, end) in zip(input_ids, encoding['offset_mapping'])]
    return input_ids, labels


# -----------------------------------------------------------------------------
# templates and label masks (SPEC §8)

def test_phi_label_mask_token_by_token_on_word_tokenizer(word_tokenizer):
    vocab = word_tokenizer.get_vocab()
    eos = word_tokenizer.eos_token_id
    ids = lambda text: [vocab[w] for w in text.split()]
    system = ids("A chat between a curious user and an artificial intelligence assistant . The assistant gives "
                 "helpful , detailed , and polite answers to the user ' s questions .")
    prompt1 = system + ids('USER :') + [IMAGE_TOKEN_ID] + ids('What color is the circle ? ASSISTANT :')
    prompt2 = ids('USER : How many squares are there ? ASSISTANT :')
    expected_ids = prompt1 + ids('red') + [eos] + prompt2 + ids('2') + [eos]
    expected_labels = ([IGNORE_INDEX] * len(prompt1) + ids('red') + [eos]
                       + [IGNORE_INDEX] * len(prompt2) + ids('2') + [eos])
    for template in ('phi', 'vicuna_v1'):  # same text; the eos is the tokenizer's
        assert data.tokenize_conversation(TWO_TURNS, word_tokenizer, template) == (expected_ids, expected_labels)


def test_plain_learns_caption_only_on_word_tokenizer(word_tokenizer):
    vocab = word_tokenizer.get_vocab()
    caption = [vocab[w] for w in 'a large red circle at the top left'.split()]
    input_ids, labels = data.tokenize_conversation(CAPTION, word_tokenizer, 'plain')
    assert input_ids == [IMAGE_TOKEN_ID] + caption  # human text dropped; '\n' is whitespace to a word tokenizer
    assert labels == [IGNORE_INDEX] + caption


@pytest.mark.parametrize('tokenizer_name', ['word_tokenizer', 'bpe_tokenizer', 'sp_tokenizer'])
@pytest.mark.parametrize('template', ['plain', 'phi', 'vicuna_v1'])
def test_segments_equal_whole_string_encoding(tokenizer_name, template, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    image_last = [dict(TWO_TURNS[0], value='What color is the circle?\n<image>')] + TWO_TURNS[1:]
    for conversations in ([CAPTION] if template == 'plain' else [TWO_TURNS, image_last]):
        input_ids, labels = data.tokenize_conversation(conversations, tokenizer, template)
        assert (input_ids, labels) == reference_encoding(conversations, tokenizer, template)
        assert input_ids.count(IMAGE_TOKEN_ID) == 1


def test_bpe_phi_learns_answers_and_eos(bpe_tokenizer):
    input_ids, labels = data.tokenize_conversation(TWO_TURNS, bpe_tokenizer, 'phi')
    assert not data.adds_bos(bpe_tokenizer) and not data.adds_prefix_space(bpe_tokenizer)
    learned = [label for label in labels if label != IGNORE_INDEX]
    assert bpe_tokenizer.decode(learned) == ' red<|endoftext|> 2<|endoftext|>'
    assert labels[-1] == bpe_tokenizer.eos_token_id
    prompt = [i for i, label in zip(input_ids, labels) if label == IGNORE_INDEX]
    text = bpe_tokenizer.decode([i for i in prompt if i != IMAGE_TOKEN_ID])
    assert text == SYSTEM + ' USER: \nWhat color is the circle? ASSISTANT:USER: How many squares are there? ASSISTANT:'


def test_sentencepiece_vicuna_bos_and_no_stray_prefix(sp_tokenizer):
    assert data.adds_bos(sp_tokenizer) and data.adds_prefix_space(sp_tokenizer)
    input_ids, labels = data.tokenize_conversation(TWO_TURNS, sp_tokenizer, 'vicuna_v1')
    assert input_ids[0] == sp_tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert input_ids.count(sp_tokenizer.bos_token_id) == 1
    tokens = sp_tokenizer.convert_ids_to_tokens([i for i in input_ids if i != IMAGE_TOKEN_ID])
    eos_at = tokens.index('</s>')
    assert tokens[eos_at + 1] != '▁' and tokens[eos_at + 1].startswith('U')  # "USER" after eos, no dummy '▁'
    learned = [label for label in labels if label != IGNORE_INDEX]
    assert sp_tokenizer.decode(learned) == 'red</s> 2</s>'  # the decoder strips the first leading space


@pytest.mark.parametrize('tokenizer_name', ['word_tokenizer', 'bpe_tokenizer', 'sp_tokenizer'])
@pytest.mark.parametrize('template', ['plain', 'phi', 'vicuna_v1'])
def test_build_prompt_is_the_training_prompt(tokenizer_name, template, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    conversations = TWO_TURNS[:2] if template != 'plain' else CAPTION
    input_ids, labels = data.tokenize_conversation(conversations, tokenizer, template)
    first_learned = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt = data.build_prompt(conversations[0]['value'], tokenizer, template)
    assert prompt == input_ids[:first_learned]
    if template == 'plain':
        assert prompt == [tokenizer.bos_token_id] * data.adds_bos(tokenizer) + [IMAGE_TOKEN_ID]


def test_text_only_conversation_has_no_placeholder(word_tokenizer):
    conversations = [{'from': 'human', 'value': 'How many squares are there?'}, {'from': 'gpt', 'value': '2'}]
    input_ids, labels = data.tokenize_conversation(conversations, word_tokenizer, 'phi')
    assert IMAGE_TOKEN_ID not in input_ids
    assert [label for label in labels if label != IGNORE_INDEX] == [word_tokenizer.get_vocab()['2'],
                                                                   word_tokenizer.eos_token_id]


@pytest.mark.parametrize('conversations, problem', [
    ([], 'empty conversation'),
    ([{'from': 'gpt', 'value': 'red'}, {'from': 'human', 'value': 'What?'}], 'turns are not human/gpt'),
    ([{'from': 'human', 'value': '<image> <image>'}, {'from': 'gpt', 'value': 'red'}], 'more than one <image>'),
    ([{'from': 'human', 'value': 'What?'}, {'from': 'gpt', 'value': 'red'},
      {'from': 'human', 'value': 'x <image>'}, {'from': 'gpt', 'value': 'y'}], 'not in the first'),
])
def test_malformed_conversations_are_rejected(conversations, problem, word_tokenizer):
    with pytest.raises(ValueError, match=problem):
        data.tokenize_conversation(conversations, word_tokenizer, 'phi')


# -----------------------------------------------------------------------------
# images

def test_load_image_pads_with_the_mean_colour(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(10, 30, 3), dtype=np.uint8)  # 30 wide, 10 high
    Image.fromarray(pixels).save(tmp_path / 'wide.png')
    image = data.load_image(str(tmp_path / 'wide.png'), 30)
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 30)
    pad = torch.tensor(data.PAD_COLOR, dtype=torch.uint8).view(3, 1, 1)
    assert (image[:, :10] == pad).all() and (image[:, 20:] == pad).all()  # the border bands
    assert torch.equal(image[:, 10:20].permute(1, 2, 0), torch.from_numpy(pixels))  # centred, untouched
    small = data.load_image(str(tmp_path / 'wide.png'), 16)
    assert small.shape == (3, 16, 16) and torch.equal(small[:, 0, 0], pad.view(3))


def test_load_image_errors_name_the_path(tmp_path):
    (tmp_path / 'garbage.jpg').write_bytes(b'\xff\xd8\xff not a jpeg at all' * 10)
    for name in ('garbage.jpg', 'missing.png'):
        with pytest.raises(OSError, match=name):
            data.load_image(str(tmp_path / name), 16)


# -----------------------------------------------------------------------------
# LLaVADataset, bad samples, truncation, collate (SPEC §9)

def human_gpt(question, answer):
    return [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]


BAD_AT_INIT = {  # id -> (sample, the reason counted in dataset.skipped)
    'missing': ({'image': 'nowhere.png', 'conversations': human_gpt('<image>\nWhat color?', 'red')},
                'image file not found'),
    'orphan_token': ({'conversations': human_gpt('<image>\nWhat color?', 'red')},
                     '<image> in the text but the sample has no image'),
    'empty': ({'image': 'good.png', 'conversations': []}, 'empty conversation'),
    'two_images': ({'image': 'good.png', 'conversations': human_gpt('<image> <image>\nWhat color?', 'red')},
                   'more than one <image>'),
}
BAD_AT_LOAD = {  # id -> (sample, words of the error)
    'corrupt': ({'image': 'corrupt.jpg', 'conversations': human_gpt('<image>\nWhat color?', 'red')},
                'unreadable image'),
    'long': ({'image': 'good.png', 'conversations': human_gpt('<image>\n' + 'What color ? ' * 20, 'red')},
             'too long'),
}
GOOD = {
    'good': {'image': 'good.png', 'conversations': human_gpt('<image>\nWhat color is the circle?', 'red')},
    'text': {'conversations': human_gpt('How many squares are there?', '2')},
    'no_token': {'image': 'good.png', 'conversations': human_gpt('What color is the circle?', 'red')},
}
MAX_LENGTH, NUM_VISUAL_TOKENS, IMAGE_SIZE = 64, 8, 16


def write_dataset(folder, samples):
    Image.fromarray(np.full((12, 20, 3), 200, dtype=np.uint8)).save(folder / 'good.png')
    (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0' + bytes(range(256)) * 4)  # a JPEG header, then junk
    with open(folder / 'train.json', 'w') as f:
        json.dump([dict(sample, id=sample_id) for sample_id, sample in samples.items()], f)
    return str(folder / 'train.json')


def make_dataset(folder, samples, tokenizer, on_bad_sample='skip', max_length=MAX_LENGTH):
    return data.LLaVADataset(write_dataset(folder, samples), str(folder), tokenizer, 'phi', IMAGE_SIZE,
                             max_length, NUM_VISUAL_TOKENS, on_bad_sample=on_bad_sample)


def test_bad_samples_are_skipped_and_counted(tmp_path, word_tokenizer):
    samples = dict(GOOD, **{k: s for k, (s, _) in BAD_AT_INIT.items()}, **{k: s for k, (s, _) in BAD_AT_LOAD.items()})
    dataset = make_dataset(tmp_path, samples, word_tokenizer)
    assert dataset.skipped == {reason: 1 for _, reason in BAD_AT_INIT.values()}
    assert dataset.image_token_added == 1  # 'no_token' got '<image>\n' in front, as LLaVA does
    assert [s['id'] for s in dataset.samples] == ['good', 'text', 'no_token', 'corrupt', 'long']
    items = [dataset[i] for i in range(len(dataset))]
    assert items[3] is None and items[4] is None  # found at load time
    assert items[2]['input_ids'].tolist().count(IMAGE_TOKEN_ID) == 1
    batch = data.collate(items, word_tokenizer.pad_token_id, IMAGE_SIZE)
    assert batch['num_skipped'] == 2 and batch['ids'] == ['good', 'text', 'no_token']
    assert batch['images'].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)  # 'good' and 'no_token'; 'text' has none


@pytest.mark.parametrize('sample_id', list(BAD_AT_INIT))
def test_bad_sample_at_init_is_an_error_naming_it(sample_id, tmp_path, word_tokenizer):
    sample, reason = BAD_AT_INIT[sample_id]
    with pytest.raises(ValueError) as error:
        make_dataset(tmp_path, dict(GOOD, **{sample_id: sample}), word_tokenizer, on_bad_sample='error')
    message = str(error.value)
    assert repr(sample_id) in message and 'train.json' in message and reason in message
    if 'image' in sample:
        assert sample['image'] in message


@pytest.mark.parametrize('sample_id', list(BAD_AT_LOAD))
def test_bad_sample_at_load_is_an_error_naming_it(sample_id, tmp_path, word_tokenizer):
    sample, words = BAD_AT_LOAD[sample_id]
    dataset = make_dataset(tmp_path, {sample_id: sample}, word_tokenizer, on_bad_sample='error')
    with pytest.raises(ValueError) as error:
        dataset[0]
    assert repr(sample_id) in str(error.value) and sample['image'] in str(error.value) and words in str(error.value)


def test_truncation_cuts_the_tail_and_keeps_the_placeholder(tmp_path, word_tokenizer):
    turns = human_gpt('<image>\nWhat color is the circle?', 'red') + human_gpt('How many squares are there?', '2') * 3
    full_ids, _ = data.tokenize_conversation(turns, word_tokenizer, 'phi')
    max_length = len(full_ids) - 5 + NUM_VISUAL_TOKENS - 1  # 5 positions short once the image is spliced in
    item = make_dataset(tmp_path, {'multi': {'image': 'good.png', 'conversations': turns}}, word_tokenizer,
                        max_length=max_length)[0]
    input_ids, labels = item['input_ids'].tolist(), item['labels'].tolist()
    assert len(input_ids) - 1 + NUM_VISUAL_TOKENS == max_length
    assert input_ids == full_ids[:len(input_ids)] and input_ids.count(IMAGE_TOKEN_ID) == 1
    assert word_tokenizer.get_vocab()['red'] in labels
    # two positions less and the first answer no longer fits after the prompt and image: a bad sample
    tight = len(full_ids[:full_ids.index(word_tokenizer.get_vocab()['red'])]) - 1 + NUM_VISUAL_TOKENS
    assert make_dataset(tmp_path, {'multi': {'image': 'good.png', 'conversations': turns}}, word_tokenizer,
                        max_length=tight)[0] is None


def test_collate_pads_right_and_masks(word_tokenizer):
    pad = word_tokenizer.pad_token_id
    image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    batch = [dict(id='a', input_ids=torch.tensor([5, IMAGE_TOKEN_ID, 6, 7]), labels=torch.tensor([-100, -100, 6, 7]),
                  image=image),
             None,
             dict(id='b', input_ids=torch.tensor([8, 9]), labels=torch.tensor([-100, 9]), image=None)]
    out = data.collate(batch, pad, IMAGE_SIZE)
    assert out['input_ids'].tolist() == [[5, IMAGE_TOKEN_ID, 6, 7], [8, 9, pad, pad]]
    assert out['attention_mask'].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out['labels'].tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert out['images'].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and out['images'].dtype == torch.uint8
    assert out['ids'] == ['a', 'b'] and out['num_skipped'] == 1
    text_only = data.collate(batch[2:], pad, IMAGE_SIZE)
    assert text_only['images'].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)


# -----------------------------------------------------------------------------
# the shapes world

SMALL = dict(num_train_images=30, num_pope_images=12, num_gqa_images=8, num_mme_images=3)


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('shapes')
    data.prepare_shapes(str(out_dir), seed=0, **SMALL)
    return out_dir


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_prepare_shapes_is_deterministic_and_complete(shapes_dir, tmp_path):
    data.prepare_shapes(str(tmp_path / 'again'), seed=0, **SMALL)
    files = all_files(shapes_dir)
    assert files == all_files(tmp_path / 'again')
    assert all(filecmp.cmp(shapes_dir / f, tmp_path / 'again' / f, shallow=False) for f in files)
    expected = ['pretrain.json', 'instruct.json', 'tokenizer/tokenizer.json', 'eval/pope/llava_pope_test.jsonl',
                'eval/gqa/llava_gqa_testdev_balanced.jsonl', 'eval/gqa/testdev_balanced_questions.json',
                'eval/mme/llava_mme.jsonl']
    expected += [f'eval/pope/coco/coco_pope_{split}.json' for split in ('random', 'popular', 'adversarial')]
    expected += [f'eval/mme/MME_Benchmark_release_version/{subtask}/{kind}/0000.{ext}'
                 for subtask in ('existence', 'count', 'position', 'color')
                 for kind, ext in (('images', 'png'), ('questions_answers_YN', 'txt'))]
    assert set(expected) <= set(files)
    data.prepare_shapes(str(tmp_path / 'other'), seed=1, **SMALL)
    assert not filecmp.cmp(shapes_dir / 'pretrain.json', tmp_path / 'other' / 'pretrain.json', shallow=False)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_shapes_training_data_loads_through_the_dataset(shapes_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(shapes_dir / 'tokenizer'))
    for name, template in (('pretrain.json', 'plain'), ('instruct.json', 'phi')):
        dataset = data.LLaVADataset(str(shapes_dir / name), str(shapes_dir / 'images'), tokenizer, template,
                                    IMAGE_SIZE, 512, NUM_VISUAL_TOKENS, on_bad_sample='error')
        items = [dataset[i] for i in range(len(dataset))]
        assert not dataset.skipped and dataset.image_token_added == 0 and None not in items
        assert all(tokenizer.unk_token_id not in item['input_ids'] for item in items)  # vocabulary covers all
    assert sum(item['image'] is None for item in items) >= 1  # instruct has text-only samples


def test_shapes_tokenizer_round_trips(shapes_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(shapes_dir / 'tokenizer'))
    sentence = 'Is there a red circle in the image? Please answer yes or no.'
    ids = tokenizer.encode(sentence)
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == sentence
    assert tokenizer.eos_token == '<|endoftext|>' and tokenizer.pad_token_id is not None
    for answer in ('Yes', 'No', 'red', '2', 'top left'):
        assert tokenizer.decode(tokenizer.encode(answer) + [tokenizer.eos_token_id], skip_special_tokens=True) == answer


def test_shapes_pope_files(shapes_dir):
    questions = read_jsonl(shapes_dir / 'eval/pope/llava_pope_test.jsonl')
    assert len({q['question_id'] for q in questions}) == len(questions)
    positives = {}
    for split in ('random', 'popular', 'adversarial'):
        labels = read_jsonl(shapes_dir / f'eval/pope/coco/coco_pope_{split}.json')
        split_questions = [q for q in questions if q['category'] == split]
        assert [a['question_id'] for a in labels] == [q['question_id'] for q in split_questions]  # same order
        assert [a['label'] for a in labels].count('yes') == [a['label'] for a in labels].count('no')
        assert all(q['text'] == a['text'] + data.SHORT_ANSWER for q, a in zip(split_questions, labels))
        positives[split] = [(a['image'], a['text']) for a in labels if a['label'] == 'yes']
        negatives = {(a['image'], a['text']) for a in labels if a['label'] == 'no'}
        assert not negatives & set(positives[split])
    assert positives['random'] == positives['popular'] == positives['adversarial']


def test_shapes_gqa_and_mme_files(shapes_dir):
    questions = read_jsonl(shapes_dir / 'eval/gqa/llava_gqa_testdev_balanced.jsonl')
    with open(shapes_dir / 'eval/gqa/testdev_balanced_questions.json') as f:
        gold = json.load(f)
    assert [q['question_id'] for q in questions] == list(gold)
    for q in questions:
        entry = gold[q['question_id']]
        assert q['image'] == entry['imageId'] + '.png' and q['text'] == entry['question'] + data.SHORT_ANSWER
        assert (entry['answer'] in ('yes', 'no')) == (entry['types']['structural'] == 'verify')
    mme_root = shapes_dir / 'eval/mme/MME_Benchmark_release_version'
    mme = read_jsonl(shapes_dir / 'eval/mme/llava_mme.jsonl')
    assert len({q['question_id'] for q in mme}) == len(mme) == 4 * 3 * 2
    for q in mme:
        subtask, _, file = q['image'].split('/')
        assert q['category'] == subtask and (mme_root / q['image']).is_file()
        with open(mme_root / subtask / 'questions_answers_YN' / file.replace('.png', '.txt')) as f:
            lines = [line.rstrip('\n').split('\t') for line in f]
        assert [answer for _, answer in lines] == ['Yes', 'No']
        assert q['text'] in [question for question, _ in lines] and q['text'].endswith(' Please answer yes or no.')
