"""
Data for nanoMoCHA: LLaVA-format training data, the conversation templates, images and
batches. The synthetic shapes world that stands in for LLaVA's data offline is in shapes.py.

References: LLaVA-1.5 (llava/train/train.py: preprocess_multimodal, preprocess_plain, preprocess_v1,
expand2square, LazySupervisedDataset; llava/mm_utils.py: tokenizer_image_token) and the released MoCHA
code (llava/train/moec_train.py: preprocess_phi), which reuses them.

    load_image            RGB, to a square: padded with the mean colour (stage 2, eval) or centre-cropped (stage 1)
    tokenize_conversation the templates plain / phi / vicuna_v1 and their label masks, token for token
    build_prompt          the inference prompt of one question (for eval.py)
    LLaVADataset, collate LLaVA training JSON -> padded batches, bad samples skipped or fatal
    dry_run_report        what train.py --dry_run=True prints
"""
import json
import os
import sys
from collections import Counter

import numpy as np
import torch
from PIL import Image

from mocha import IGNORE_INDEX, IMAGE_TOKEN_ID  # -100, and -200: LLaVA's placeholder the visual tokens replace

IMAGE_TEXT = '<image>'

# -----------------------------------------------------------------------------
# images. The released MoCHA scripts, as LLaVA-1.5's: stage 1 (scripts/moec_phi/pretrain.sh) leaves
# image_aspect_ratio at LLaVA's default 'square', where CLIP's image processor resizes the short side and crops the
# centre; stage 2 (scripts/moec_phi/finetune.sh) passes --image_aspect_ratio pad, and evaluation follows the
# stage-2 model's setting. Nothing in an image is lost to a crop after stage 1.
IMAGE_ASPECTS = ('crop', 'pad')

# LLaVA-1.5's 'pad' mode (expand2square) fills with the image processor's mean colour,
# tuple(int(x * 255) for x in image_mean); the released MoCHA code uses the CLIP processor, so this is
# the CLIP mean (0.48145466, 0.4578275, 0.40821073). Per-encoder normalisation happens in the model.
PAD_COLOR = (122, 116, 104)


def load_image(path, image_size, aspect='pad'):
    """The image at `path` as a uint8 tensor [3, image_size, image_size]: RGB; aspect 'pad': centred on a square of
    PAD_COLOR, then resized; 'crop': its short side resized to image_size, then the centre cut out (CLIP's image
    processor). Bicubic. Raises OSError naming the path if it is missing or unreadable."""
    assert aspect in IMAGE_ASPECTS, f"aspect must be one of {IMAGE_ASPECTS}, got {aspect!r}"
    try:
        with Image.open(path) as img:
            img = img.convert('RGB')  # decodes the whole file: a truncated JPEG fails here, not later
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise OSError(f"cannot read image {path}: {err}") from err
    width, height = img.size
    if aspect == 'pad':
        side = max(width, height)
        square = Image.new('RGB', (side, side), PAD_COLOR)
        square.paste(img, ((side - width) // 2, (side - height) // 2))
        square = square.resize((image_size, image_size), Image.BICUBIC)
    else:
        scale = image_size / min(width, height)
        width, height = max(image_size, round(width * scale)), max(image_size, round(height * scale))
        left, top = (width - image_size) // 2, (height - image_size) // 2
        square = img.resize((width, height), Image.BICUBIC).crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.array(square)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


# -----------------------------------------------------------------------------
# conversation templates, token for token as LLaVA-1.5 / the released MoCHA code tokenise them
# (llava/train/train.py: preprocess_multimodal, preprocess_plain, preprocess_v1; MoCHA's
# llava/train/moec_train.py: preprocess_phi; llava/mm_utils.py: tokenizer_image_token)

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# plain (stage 1):  <image>caption\n                                              learned: caption\n
# phi, vicuna_v1:   SYSTEM USER: <image>\nq ASSISTANT: a<eos>USER: q2 ASSISTANT: a2<eos>...
#                                                                   learned: " a<eos>", " a2<eos>"
# The two chat templates differ only in their eos, which is the tokenizer's own eos token
# (<|endoftext|> for Phi-2, </s> for Vicuna), so both are one code path.
TEMPLATES = ('plain', 'phi', 'vicuna_v1')


def image_first(text):
    """LLaVA's preprocess_multimodal: the turn that holds '<image>' becomes '<image>\n' + the rest of
    its text, stripped, wherever the JSON put the placeholder ('Q\n<image>' and '<image>\nQ' both
    occur in LLaVA-665K). Every LLaVA-style evaluation prompt has this layout too."""
    if IMAGE_TEXT not in text:
        return text
    return (IMAGE_TEXT + '\n' + text.replace(IMAGE_TEXT, '').strip()).strip()


def conversation_text(conversations, template, eos):
    """The whole conversation as the one string the released code tokenises, and the (start, end)
    character spans of the text the model learns. An answer's span starts at the space after
    "ASSISTANT:" and ends after its eos; plain learns everything after the image."""
    if template == 'plain':  # preprocess_plain keeps only the image of the human turn, whatever its text
        text = IMAGE_TEXT + conversations[1]['value'] + '\n'
        return text, [(len(IMAGE_TEXT), len(text))]
    text, learned = SYSTEM + ' ', []
    for i, (human, gpt) in enumerate(zip(conversations[0::2], conversations[1::2])):
        question = image_first(human['value']) if i == 0 else human['value']
        text += f"USER: {question} ASSISTANT:"
        answer = ' ' + gpt['value'] if gpt['value'] else ''  # an empty answer learns its eos alone
        learned.append((len(text), len(text) + len(answer) + len(eos)))
        text += answer + eos
    return text, learned


def tokenize_text(text, tokenizer, learned=()):
    """(input_ids, labels) of `text`, as tokenizer_image_token does it: the text is cut at '<image>',
    each chunk is encoded on its own (with the tokenizer's bos, kept only on the first chunk), and
    one IMAGE_TOKEN_ID stands between chunks. So with SentencePiece (Llama, Vicuna) the chunk after
    the image starts with its own dummy prefix '▁'; byte-level BPE (Phi-2) adds nothing.
    A token is learned when it starts inside a `learned` character span. Labels come from the
    character offsets of each token, never from re-counting tokens of prompt pieces, so no template
    text inside a message and no tokenizer quirk (legacy or not) can shift them."""
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets; load a fast tokenizer "
                         "(AutoTokenizer with use_fast=True)")
    input_ids, labels, chunk_start, bos = [], [], 0, None
    for i, chunk in enumerate(text.split(IMAGE_TEXT)):
        encoding = tokenizer(chunk, return_offsets_mapping=True)
        ids, offsets = encoding['input_ids'], encoding['offset_mapping']
        if i == 0:
            bos = ids[0] if ids and ids[0] == tokenizer.bos_token_id else None
        else:
            input_ids.append(IMAGE_TOKEN_ID)
            labels.append(IGNORE_INDEX)
            if bos is not None:  # the released code drops the first token of later chunks (their bos)
                ids, offsets = ids[1:], offsets[1:]
        for token, (start, end) in zip(ids, offsets):
            is_text = end > start  # bos and other added-by-template tokens cover no characters
            at = chunk_start + start
            input_ids.append(token)
            labels.append(token if is_text and any(a <= at < b for a, b in learned) else IGNORE_INDEX)
        chunk_start += len(chunk) + len(IMAGE_TEXT)
    return input_ids, labels


def conversation_problem(conversations, template):
    """What is wrong with a LLaVA `conversations` list for this template, or None."""
    if not isinstance(conversations, list) or not conversations:
        return 'empty conversation'
    if len(conversations) % 2 or any(not isinstance(turn, dict) or turn.get('from') != ('human', 'gpt')[i % 2]
                                     or not isinstance(turn.get('value'), str)
                                     for i, turn in enumerate(conversations)):
        return 'turns are not human/gpt pairs with text values'
    if template == 'plain' and len(conversations) != 2:
        return 'plain template needs exactly one human and one gpt turn'
    num_images = sum(turn['value'].count(IMAGE_TEXT) for turn in conversations)
    if num_images > 1:
        return 'more than one <image>'
    if num_images == 1 and IMAGE_TEXT not in conversations[0]['value']:
        return '<image> is not in the first human turn'
    return None


def tokenize_conversation(conversations, tokenizer, template):
    """(input_ids, labels) lists for one LLaVA conversation: '<image>' becomes one IMAGE_TOKEN_ID,
    labels are IGNORE_INDEX except the answers and their eos (phi, vicuna_v1) or the caption (plain)."""
    assert template in TEMPLATES, f"unknown template {template!r}, expected one of {TEMPLATES}"
    problem = conversation_problem(conversations, template)
    if problem:
        raise ValueError(problem)
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; the chat templates end every answer with it")
    text, learned = conversation_text(conversations, template, tokenizer.eos_token)
    return tokenize_text(text, tokenizer, learned)


def build_prompt(question, tokenizer, template):
    """Token ids of the inference prompt for one question: the training text up to and including
    "ASSISTANT:" (phi, vicuna_v1), or just the image (plain), tokenised by the same rules, so the ids
    equal the prompt part of tokenize_conversation's ids for the same question."""
    assert template in TEMPLATES, f"unknown template {template!r}, expected one of {TEMPLATES}"
    if template == 'plain':
        return tokenize_text(IMAGE_TEXT if IMAGE_TEXT in question else '', tokenizer)[0]
    return tokenize_text(f"{SYSTEM} USER: {image_first(question)} ASSISTANT:", tokenizer)[0]


# -----------------------------------------------------------------------------
# LLaVA training data: [{"id", "image"?, "conversations": [{"from", "value"}, ...]}, ...]

def fit_to_length(input_ids, labels, max_length, num_visual_tokens):
    """Cut the tail so the sequence fits max_length once the placeholder is replaced by
    num_visual_tokens rows. Returns (input_ids, labels) or a reason string when the
    prompt and image alone do not fit (truncation then would cut the placeholder or every answer)."""
    learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not learned:
        return 'nothing to learn (no answer tokens)'
    budget = max_length - (num_visual_tokens - 1 if IMAGE_TOKEN_ID in input_ids else 0)
    if learned[0] >= budget:  # the placeholder sits in the prompt, before the first learned token
        return f'too long: the prompt and image need more than max_length={max_length} positions'
    return input_ids[:budget], labels[:budget]


class LLaVADataset(torch.utils.data.Dataset):
    """LLaVA training JSON -> dict(id, input_ids, labels, image uint8 [3,S,S] or None) per sample.

    Bad samples raise ValueError naming the file, sample id and image with
    on_bad_sample='error', or are skipped and counted with on_bad_sample='skip'. The cheap checks
    (conversation structure, <image> count and place, image file exists) run here, and their skips are
    counted in self.skipped (reason -> count). Problems only seen when loading (unreadable image,
    too long after tokenising) make __getitem__ print the reason and return None; collate drops those
    and reports num_skipped, so a corrupt JPEG never stops a long run.
    A sample with an image but no '<image>' in its text gets '<image>\\n' put in front of its first human
    turn (counted in self.image_token_added). This is a deliberate deviation: the released code loads
    such an image and never shows it to the model, which then trains on the text alone.
    experts: a MoVA model's experts, in its adapter's order; each item then has expert_mask [E] bool, the experts
    named by the sample's "experts" list (mova.write_routing_data's routing labels), every one where it has none.
    For any other model the key is ignored."""

    def __init__(self, json_path, image_folder, tokenizer, template, image_size, max_length,
                 num_visual_tokens, on_bad_sample='skip', image_aspect='pad', experts=()):
        assert template in TEMPLATES, f"unknown template {template!r}, expected one of {TEMPLATES}"
        assert on_bad_sample in ('skip', 'error'), f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}"
        self.json_path, self.image_folder, self.tokenizer, self.template = json_path, image_folder, tokenizer, template
        self.image_size, self.max_length, self.num_visual_tokens = image_size, max_length, num_visual_tokens
        self.on_bad_sample, self.image_aspect, self.experts = on_bad_sample, image_aspect, list(experts)
        with open(json_path) as f:
            samples = json.load(f)
        if not isinstance(samples, list):
            raise ValueError(f"{json_path}: expected a JSON list of samples, got {type(samples).__name__}")
        self.skipped = Counter()
        self.image_token_added = 0
        self.samples = [s for s in (self.checked(i, s) for i, s in enumerate(samples)) if s is not None]

    def image_path(self, sample):
        return os.path.join(self.image_folder, sample['image']) if sample.get('image') else None

    def bad_sample(self, sample, reason):
        """Raise (on_bad_sample='error') or return the message to log."""
        image = self.image_path(sample)
        message = f"{self.json_path}: sample {sample.get('id')!r}{f' (image {image})' if image else ''}: {reason}"
        if self.on_bad_sample == 'error':
            raise ValueError(message)
        return message

    def checked(self, index, sample):
        """The sample ready for __getitem__, or None (counted) when a cheap check fails."""
        if not isinstance(sample, dict):
            sample = {'id': f'#{index}', 'conversations': None}
        sample.setdefault('id', f'#{index}')
        conversations = sample.get('conversations')
        reason = conversation_problem(conversations, self.template)
        has_image_text = not reason and IMAGE_TEXT in conversations[0]['value']
        image = self.image_path(sample)
        if not reason and image and not os.path.isfile(image):
            reason = 'image file not found'
        if not reason and has_image_text and not image:
            reason = '<image> in the text but the sample has no image'
        if not reason and self.template == 'plain' and not image:
            reason = 'plain template needs an image'  # preprocess_plain keeps only the image of the human turn
        unknown = set(sample.get('experts', ())) - set(self.experts)
        if not reason and self.experts and unknown:
            reason = f"experts {sorted(unknown)} are not the model's ({', '.join(self.experts)})"
        if reason:
            self.bad_sample(sample, reason)
            self.skipped[reason] += 1
            return None
        if image and not has_image_text:
            first = dict(conversations[0], value=IMAGE_TEXT + '\n' + conversations[0]['value'])
            sample = dict(sample, conversations=[first] + conversations[1:])
            self.image_token_added += 1
        return sample

    def __len__(self):
        return len(self.samples)

    def estimated_length(self, index):
        """Words of the sample's turns, plus its visual tokens when it has an image: cheap (no tokenizing),
        and enough to put samples of about the same length into one batch (group_by_length)."""
        sample = self.samples[index]
        words = sum(len(turn['value'].split()) for turn in sample['conversations'])
        return words + (self.num_visual_tokens if sample.get('image') else 0)

    def __getitem__(self, index):
        sample = self.samples[index]
        input_ids, labels = tokenize_conversation(sample['conversations'], self.tokenizer, self.template)
        fitted = fit_to_length(input_ids, labels, self.max_length, self.num_visual_tokens)
        if isinstance(fitted, str):
            print(f"skipping {self.bad_sample(sample, fitted)}", file=sys.stderr)
            return None
        input_ids, labels = fitted
        image = None
        if sample.get('image'):
            try:
                image = load_image(self.image_path(sample), self.image_size, self.image_aspect)
            except OSError as err:
                print(f"skipping {self.bad_sample(sample, f'unreadable image ({err})')}", file=sys.stderr)
                return None
        item = dict(id=sample['id'], input_ids=torch.tensor(input_ids), labels=torch.tensor(labels), image=image)
        if self.experts:
            chosen = sample.get('experts', self.experts)
            item['expert_mask'] = torch.tensor([name in chosen for name in self.experts])
        return item


def collate(batch, pad_token_id, image_size=None):
    """Right-padded batch of LLaVADataset items; None items (bad samples found at load
    time) are dropped and counted in num_skipped. images holds one row per sample that has an image,
    in batch order, and is empty [0, 3, S, S] when none has (S = image_size, 0 if not given); so does expert_mask
    [n_img, E] where the items have one (a MoVA dataset's)."""
    assert pad_token_id is not None, "collate needs a pad token id (use the eos id if the tokenizer has no pad)"
    samples = [s for s in batch if s is not None]
    length = max((len(s['input_ids']) for s in samples), default=0)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample['input_ids'])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = sample['input_ids'], sample['labels'], 1
    images = [s['image'] for s in samples if s['image'] is not None]
    size = image_size or 0
    images = torch.stack(images) if images else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    batch_out = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, images=images,
                     ids=[s['id'] for s in samples], num_skipped=len(batch) - len(samples))
    if samples and 'expert_mask' in samples[0]:
        masks = [s['expert_mask'] for s in samples if s['image'] is not None]
        batch_out['expert_mask'] = torch.stack(masks) if masks else torch.zeros((0, len(samples[0]['expert_mask'])),
                                                                                dtype=torch.bool)
    return batch_out


def length_grouped(order, lengths, batch_size, batches_per_group, generator=None):
    """The samples of `order` regrouped so that each batch holds samples of about the same length: each
    run of batches_per_group batches in `order` is sorted longest first and cut into batches, then all the
    batches are shuffled (with `generator`; None keeps them in order, so each run's batches stay together, as
    the micro-batches of one optimizer step). Less padding per batch; the samples of each epoch stay the same.
    Samples past the last whole batch are dropped. As the Hugging Face Trainer's group_by_length, which
    sorts groups of 50 batches, except that it keeps the batches in order within a group."""
    whole = len(order) // batch_size * batch_size
    group = batch_size * batches_per_group
    batches = []
    for start in range(0, whole, group):
        chunk = sorted(order[start:min(start + group, whole)], key=lambda i: -lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist() if generator else range(len(batches))
    return [i for b in shuffled for i in batches[b]]


# -----------------------------------------------------------------------------
# dry run: the data as the model will get it, read before a GPU is paid for (train.py --dry_run=True)

def show_tokens(input_ids, labels, tokenizer):
    """One sample, piece by piece: the tokenizer's own pieces ('▁' and 'Ġ' are spaces) joined by '|',
    learned pieces in ⟦ ⟧, the image placeholder as <image>."""
    pieces = []
    for token, label in zip(input_ids, labels):
        piece = '<image>' if token == IMAGE_TOKEN_ID else tokenizer.convert_ids_to_tokens(token)
        pieces.append(f'⟦{piece}⟧' if label != IGNORE_INDEX else piece)
    return '|'.join(pieces)


def dry_run_report(dataset, num_shown=3, max_skipped_fraction=0.01):
    """Print the first samples token by token, the visual-token count, and the length distribution once
    each image counts as its visual tokens, with how many samples max_length cuts or skips and why.
    Images are not decoded (their files were checked to exist). Returns the problems found, as strings:
    a sample with nothing to learn, or more than max_skipped_fraction of the samples skipped."""
    tokenizer, visual = dataset.tokenizer, dataset.num_visual_tokens
    print(f"{dataset.json_path}: template {dataset.template!r}, tokenizer {type(tokenizer).__name__} "
          f"({getattr(tokenizer, 'name_or_path', '')}), {visual} visual tokens per image, max_length {dataset.max_length}")
    lengths, skipped, cut, problems = [], Counter(dataset.skipped), 0, []
    for index, sample in enumerate(dataset.samples):
        input_ids, labels = tokenize_conversation(sample['conversations'], dataset.tokenizer, dataset.template)
        if index < num_shown:
            print(f"\nsample {sample['id']!r} ({len(input_ids)} ids):\n{show_tokens(input_ids, labels, tokenizer)}")
        lengths.append(len(input_ids) + (visual - 1 if IMAGE_TOKEN_ID in input_ids else 0))
        fitted = fit_to_length(input_ids, labels, dataset.max_length, visual)
        if isinstance(fitted, str):
            skipped[fitted] += 1
            if fitted.startswith('nothing to learn'):
                problems.append(f"sample {sample['id']!r}: {fitted}")
        elif len(fitted[0]) < len(input_ids):
            cut += 1
    total = len(dataset.samples) + sum(dataset.skipped.values())
    if lengths:
        q = torch.tensor(lengths, dtype=torch.float).quantile(torch.tensor([0.0, 0.5, 0.95, 0.99, 1.0])).tolist()
        print(f"\n{len(lengths)} samples; length with visual tokens: min {q[0]:.0f}, median {q[1]:.0f}, "
              f"p95 {q[2]:.0f}, p99 {q[3]:.0f}, max {q[4]:.0f}")
    print(f"cut at max_length={dataset.max_length} (tail dropped, answers before it kept): {cut}")
    for reason, count in skipped.most_common():
        print(f"skipped: {count} x {reason}")
    if dataset.image_token_added:
        print(f"'<image>\\n' put in front of the first turn of {dataset.image_token_added} samples that name an image "
              "but have no <image> in their text")
    if total and sum(skipped.values()) > max_skipped_fraction * total:
        problems.append(f"{sum(skipped.values())} of {total} samples skipped, more than "
                        f"max_skipped_fraction={max_skipped_fraction}")
    return problems
