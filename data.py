"""
Data for nanoMoCHA: LLaVA-format training data, the conversation templates, images and
batches. The synthetic shapes world that stands in for LLaVA's data offline is in shapes.py.

References: LLaVA-1.5 (llava/train/train.py: preprocess_plain, preprocess_v1,
expand2square, LazySupervisedDataset; llava/eval/*) and SPEC §6-§9.

    load_image            RGB, pad to square with the mean colour, resize (SPEC §7)
    tokenize_conversation the templates plain / phi / vicuna_v1 and their label masks (SPEC §8)
    build_prompt          the inference prompt of one question (for eval.py)
    LLaVADataset, collate LLaVA training JSON -> padded batches, bad samples skipped or fatal (SPEC §9)
"""
import json
import os
import sys
from collections import Counter

import numpy as np
import torch
from PIL import Image

from mocha import IGNORE_INDEX, IMAGE_TOKEN_ID  # -100, and -200: the placeholder the visual tokens replace (SPEC §6)

IMAGE_TEXT = '<image>'

# -----------------------------------------------------------------------------
# images (SPEC §7: "pad to square with the mean colour")

# LLaVA-1.5's 'pad' mode (expand2square) fills with the image processor's mean colour,
# tuple(int(x * 255) for x in image_mean); the released MoCHA code uses the CLIP processor, so this is
# the CLIP mean (0.48145466, 0.4578275, 0.40821073). Per-encoder normalisation happens in the model.
PAD_COLOR = (122, 116, 104)


def load_image(path, image_size):
    """The image at `path` as a uint8 tensor [3, image_size, image_size]: RGB, padded to a centred square
    with PAD_COLOR, resized (bicubic). Raises OSError naming the path if it is missing or unreadable."""
    try:
        with Image.open(path) as img:
            img = img.convert('RGB')  # decodes the whole file: a truncated JPEG fails here, not later
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise OSError(f"cannot read image {path}: {err}") from err
    width, height = img.size
    side = max(width, height)
    square = Image.new('RGB', (side, side), PAD_COLOR)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    square = square.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.array(square)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


# -----------------------------------------------------------------------------
# conversation templates (SPEC §8)

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# plain (stage 1):  <image> caption \n              learned: caption \n
# phi, vicuna_v1:   SYSTEM USER: q ASSISTANT: a<eos>USER: q2 ASSISTANT: a2<eos>...   learned: " a<eos>"
# The two chat templates differ only in their eos, which is the tokenizer's own eos token
# (<|endoftext|> for Phi-2, </s> for Vicuna), so both are one code path.
TEMPLATES = ('plain', 'phi', 'vicuna_v1')


def adds_bos(tokenizer):
    """Whether the tokenizer starts every text with its bos token (Llama/Vicuna yes, Phi-2/GPT-2 no)."""
    return tokenizer.bos_token_id is not None and tokenizer.encode('a')[:1] == [tokenizer.bos_token_id]


def adds_prefix_space(tokenizer):
    """Whether the tokenizer puts a space in front of every text it encodes (SentencePiece's dummy
    prefix '▁', Llama/Vicuna): then 'a' alone encodes like the 'a' in 'a a'. Byte-level BPE
    (GPT-2/Phi-2) keeps spaces as written ('a' != ' a')."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    return encode('a')[-1:] == encode('a a')[-1:]


def encode_segment(text, tokenizer, at_start):
    """Token ids of `text` as it reads inside a longer text (or at its start when at_start).

    We tokenise segment by segment, so each segment must come out as it would in the joined text.
    Segments carry their own spaces (" ASSISTANT:", " answer"). Byte-level BPE then needs nothing
    more. A SentencePiece tokenizer would add its dummy '▁' to every segment ("USER:" right after an
    eos would become "▁USER:"), so a segment that does not start the text is encoded behind a newline
    anchor, whose tokens ('▁', '<0x0A>') never merge with what follows, and the anchor is dropped."""
    if at_start or not adds_prefix_space(tokenizer):
        return tokenizer.encode(text, add_special_tokens=False)
    anchor = tokenizer.encode('\n', add_special_tokens=False)
    ids = tokenizer.encode('\n' + text, add_special_tokens=False)
    if ids[:len(anchor)] != anchor:
        raise ValueError(f"the newline anchor merged with the segment {text!r}; cannot tokenise it alone")
    return ids[len(anchor):]


def encode_pieces(pieces, tokenizer):
    """(input_ids, labels) of a list of (piece, learned): a piece is text, which may hold '<image>'
    (-> IMAGE_TOKEN_ID), or a token id. Labels copy the ids where learned, else IGNORE_INDEX."""
    input_ids, labels = [], []
    if adds_bos(tokenizer):
        input_ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    at_start = True  # no text before this point (a bos token is not text)
    for piece, learned in pieces:
        parts = [piece] if isinstance(piece, int) else split_image_text(piece)
        for part in parts:
            if part == '':
                continue
            ids = [part] if isinstance(part, int) else encode_segment(part, tokenizer, at_start)
            at_start = False
            input_ids += ids
            labels += ids if learned else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def split_image_text(text):
    """'USER: <image>\\nWhat?' -> ['USER: ', IMAGE_TOKEN_ID, '\\nWhat?']"""
    parts = []
    for i, chunk in enumerate(text.split(IMAGE_TEXT)):
        parts += [IMAGE_TOKEN_ID, chunk] if i > 0 else [chunk]
    return parts


def conversation_problem(conversations, template):
    """What is wrong with a LLaVA `conversations` list for this template, or None (SPEC §9)."""
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
    """(input_ids, labels) lists for one LLaVA conversation (SPEC §8). '<image>' becomes one
    IMAGE_TOKEN_ID where the text has it; labels are IGNORE_INDEX except what the template learns."""
    assert template in TEMPLATES, f"unknown template {template!r}, expected one of {TEMPLATES}"
    problem = conversation_problem(conversations, template)
    if problem:
        raise ValueError(problem)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the chat templates end every answer with it")
    if template == 'plain':
        # LLaVA's preprocess_plain drops the human text and keeps only the image
        question, caption = conversations[0]['value'], conversations[1]['value']
        pieces = [(IMAGE_TEXT if IMAGE_TEXT in question else '', False), (caption + '\n', True)]
        return encode_pieces(pieces, tokenizer)
    pieces, before_user = [], SYSTEM + ' '
    for human, gpt in zip(conversations[0::2], conversations[1::2]):
        pieces += [(f"{before_user}USER: {human['value']} ASSISTANT:", False),
                   (' ' + gpt['value'], True),
                   (tokenizer.eos_token_id, True)]
        before_user = ''  # nothing between one answer's eos and the next "USER:"
    return encode_pieces(pieces, tokenizer)


def build_prompt(question, tokenizer, template):
    """Token ids of the inference prompt for one question, ending with "ASSISTANT:" (phi, vicuna_v1)
    or just the image placeholder (plain). '<image>' in the question becomes IMAGE_TOKEN_ID; the
    ids equal the prompt part of tokenize_conversation's ids for the same question."""
    assert template in TEMPLATES, f"unknown template {template!r}, expected one of {TEMPLATES}"
    if template == 'plain':
        return encode_pieces([(IMAGE_TEXT if IMAGE_TEXT in question else '', False)], tokenizer)[0]
    return encode_pieces([(f"{SYSTEM} USER: {question} ASSISTANT:", False)], tokenizer)[0]


# -----------------------------------------------------------------------------
# LLaVA training data (SPEC §9): [{"id", "image"?, "conversations": [{"from", "value"}, ...]}, ...]

def fit_to_length(input_ids, labels, max_length, num_visual_tokens):
    """Cut the tail so the sequence fits max_length once the placeholder is replaced by
    num_visual_tokens rows (SPEC §6, §7). Returns (input_ids, labels) or a reason string when the
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

    Bad samples (SPEC §9, issue 3) raise ValueError naming the file, sample id and image with
    on_bad_sample='error', or are skipped and counted with on_bad_sample='skip'. The cheap checks
    (conversation structure, <image> count and place, image file exists) run here, and their skips are
    counted in self.skipped (reason -> count). Problems only seen when loading (unreadable image,
    too long after tokenising) make __getitem__ print the reason and return None; collate drops those
    and reports num_skipped, so a corrupt JPEG never stops a long run.
    A sample with an image but no '<image>' in its text gets '<image>\\n' prepended to its first human
    turn, as LLaVA-1.5's preprocess_multimodal puts it there (counted in self.image_token_added)."""

    def __init__(self, json_path, image_folder, tokenizer, template, image_size, max_length,
                 num_visual_tokens, on_bad_sample='skip'):
        assert template in TEMPLATES, f"unknown template {template!r}, expected one of {TEMPLATES}"
        assert on_bad_sample in ('skip', 'error'), f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}"
        self.json_path, self.image_folder, self.tokenizer, self.template = json_path, image_folder, tokenizer, template
        self.image_size, self.max_length, self.num_visual_tokens = image_size, max_length, num_visual_tokens
        self.on_bad_sample = on_bad_sample
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
                image = load_image(self.image_path(sample), self.image_size)
            except OSError as err:
                print(f"skipping {self.bad_sample(sample, f'unreadable image ({err})')}", file=sys.stderr)
                return None
        return dict(id=sample['id'], input_ids=torch.tensor(input_ids), labels=torch.tensor(labels), image=image)


def collate(batch, pad_token_id, image_size=None):
    """Right-padded batch (SPEC §6) of LLaVADataset items; None items (bad samples found at load
    time) are dropped and counted in num_skipped. images holds one row per sample that has an image,
    in batch order, and is empty [0, 3, S, S] when none has (S = image_size, 0 if not given)."""
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
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, images=images,
                ids=[s['id'] for s in samples], num_skipped=len(batch) - len(samples))
