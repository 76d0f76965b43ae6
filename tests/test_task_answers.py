"""Task answers are tokenised in the context of their prompt: the token the model predicts next, on
SentencePiece (stories260k's Llama tokenizer), GPT-2 byte-level BPE and Gemma-style SentencePiece."""

from __future__ import annotations

import pytest
import torch

from featcircuits.circuits import ContrastiveTask
from featcircuits.circuits.tasks import continuation_token

PROMPT = "Once upon a time, there was a little girl named"
CORPUS = ["Once upon a time there was a girl named Mary.", "Mary had a little lamb.", "The dog was named Max.",
          "A boy named Tom liked Mary.", "She named the cat Lily.", "Lily and Mary played.", "The dogs ran."] * 20
BYTE_PROMPT = "A boy named Tom liked Mary. The girl was named"


def tiny_model(tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_heads=4, n_ctx=64, d_vocab=len(tokenizer),
                                  act_fn="gelu", normalization_type="LN")
    return HookedTransformer(cfg, tokenizer=tokenizer)


def trained_tokenizer(tmp_path_factory, name: str, setup, special: list[str], **names):
    """A BPE trained offline on ``CORPUS``, saved and reloaded as a transformers fast tokenizer (TransformerLens
    reloads a tokenizer from its own directory)."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    alphabet = setup(tokenizer)
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                              initial_alphabet=alphabet, show_progress=False))
    folder = tmp_path_factory.mktemp(name)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory):
    from tokenizers import decoders, pre_tokenizers

    def setup(tokenizer):
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return pre_tokenizers.ByteLevel.alphabet()

    return tiny_model(trained_tokenizer(tmp_path_factory, "gpt2", setup, ["<|endoftext|>"],
                                        bos_token="<|endoftext|>", eos_token="<|endoftext|>"))


@pytest.fixture(scope="module")
def gemma_style(tmp_path_factory):
    """SentencePiece without a dummy prefix: a word glued to the one before it is a piece of its own."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    def setup(tokenizer):
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
        return []

    return tiny_model(trained_tokenizer(tmp_path_factory, "gemma", setup, ["<pad>", "<eos>", "<bos>"],
                                        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"))


def in_sentence(model, prompt: str, text: str) -> int:
    """The token at the answer's position when the whole sentence is tokenised at once."""
    return model.to_tokens(prompt + text)[0, model.to_tokens(prompt).shape[1]].item()


def test_stories260k_answer_with_or_without_a_leading_space_is_the_predicted_token(stories_model):
    model = stories_model
    pieces = model.tokenizer.convert_ids_to_tokens
    alone = model.to_tokens(" Lily", prepend_bos=False)[0].tolist()
    assert pieces(alone) == ["▁", "▁Lily"]  # alone, a stray "▁" comes first
    spaced, bare = continuation_token(model, PROMPT, " Lily"), continuation_token(model, PROMPT, "Lily")
    assert spaced == bare and pieces([spaced]) == ["▁Lily"]
    assert spaced == in_sentence(model, PROMPT, " Lily")
    assert spaced == model(PROMPT)[0, -1].argmax().item()  # what the model actually predicts there
    assert continuation_token(model, "", "Lily") == spaced  # no prompt but BOS: the word alone
    assert continuation_token(model, "She gave her", " friend") == model.to_single_token("friend")
    assert pieces([continuation_token(model, PROMPT, ".")]) == ["."]  # punctuation continues the word
    pairs = [{"clean": PROMPT, "corrupt": PROMPT.replace("girl", "boy"), "answer": " Lily", "distractor": " Tim"},
             {"clean": PROMPT, "corrupt": PROMPT.replace("girl", "boy"), "answer": "Lily", "distractor": "Tim"}]
    task = ContrastiveTask.from_pairs(model, pairs)
    assert task.answers.tolist() == [spaced, spaced]
    assert task.distractors.tolist() == [in_sentence(model, PROMPT, " Tim")] * 2
    ids = model.to_tokens(PROMPT)[0].tolist()  # token-id prompts: the answer follows their decoded text
    assert continuation_token(model, ids, " Lily") == spaced


def test_gpt2_byte_level_answers_follow_the_prompt(gpt2_style):
    model = gpt2_style
    pieces = model.tokenizer.convert_ids_to_tokens
    spaced = continuation_token(model, BYTE_PROMPT, " Mary")
    assert pieces([spaced]) == ["ĠMary"] and spaced == in_sentence(model, BYTE_PROMPT, " Mary")
    assert pieces(model.to_tokens(" Mary", prepend_bos=False)[0].tolist()) == ["ĠMary"]
    glued = continuation_token(model, BYTE_PROMPT, "Mary")  # no space: it continues the prompt's last word
    assert glued == in_sentence(model, BYTE_PROMPT, "Mary") and pieces([glued]) == ["Mary"] and glued != spaced
    task = ContrastiveTask.from_pairs(model, [{"clean": BYTE_PROMPT, "corrupt": BYTE_PROMPT.replace("boy", "dog"),
                                               "answer": " Mary", "distractor": " Tom"}])
    assert task.answers.tolist() == [spaced] and task.distractors.tolist() == [in_sentence(model, BYTE_PROMPT, " Tom")]
    with pytest.raises(ValueError, match=r"answer 's' merges with the end of its prompt 'The dog': the prompt ends in "
                                         r"tokens \['Ġdog'\] but 'The dogs' tokenises to \['Ġdogs'\]"):
        continuation_token(model, "The dog", "s")  # "dogs" is one token: no token of "s" follows "Ġdog"


def test_gemma_style_answers_with_and_without_a_space_are_both_valid(gemma_style):
    model = gemma_style
    pieces = model.tokenizer.convert_ids_to_tokens
    spaced, bare = continuation_token(model, BYTE_PROMPT, " Mary"), continuation_token(model, BYTE_PROMPT, "Mary")
    assert pieces([spaced]) == ["▁Mary"] and pieces([bare]) == ["Mary"]
    assert spaced == in_sentence(model, BYTE_PROMPT, " Mary") and bare == in_sentence(model, BYTE_PROMPT, "Mary")


def test_answers_that_add_no_token_or_several_fail_naming_them(stories_model, gpt2_style):
    with pytest.raises(ValueError, match=r"pair 0 answer '' adds no token after its prompt"):
        ContrastiveTask.from_pairs(stories_model, [{"clean": PROMPT, "corrupt": PROMPT, "answer": ""}])
    with pytest.raises(ValueError, match=r"answer '' adds no token"):
        continuation_token(gpt2_style, BYTE_PROMPT, "")
    with pytest.raises(ValueError, match=r"distractor ' Tom' is not a single token: it tokenises to 2 tokens "
                                         r"\['▁T', 'om'\] after its prompt"):
        ContrastiveTask.from_pairs(stories_model, [{"clean": PROMPT, "corrupt": PROMPT, "answer": "Lily",
                                                    "distractor": " Tom"}])
    with pytest.raises(ValueError, match=r"merges with the end of its prompt .*move a trailing space"):
        continuation_token(stories_model, PROMPT + " ", "Lily")  # the prompt's own trailing "▁" token
    random_ids = torch.randint(3, 500, (6,), generator=torch.Generator().manual_seed(0)).tolist()
    with pytest.raises(ValueError, match="do not decode to text tokenising back to the same ids.*as a token id"):
        continuation_token(stories_model, random_ids, " Lily")  # these ids are not how their text tokenises
    assert continuation_token(stories_model, PROMPT, 317) == 317 and continuation_token(stories_model, PROMPT, [9]) == 9


def test_tasks_refuse_booleans_out_of_vocabulary_ids_and_overlong_prompts(stories_model):
    from featcircuits.circuits import ContrastiveTask

    good = {"clean": [1, 5, 6], "corrupt": [1, 7, 6], "answer": 9, "distractor": 10}
    with pytest.raises(ValueError, match="not true/false"):
        ContrastiveTask.from_pairs(stories_model, [{**good, "answer": True}])
    with pytest.raises(ValueError, match="must be text or a non-empty list of token ids"):
        ContrastiveTask.from_pairs(stories_model, [{**good, "clean": [1, True, 6]}])
    with pytest.raises(ValueError, match=r"token id\(s\) \[600\] are outside the model's vocabulary \[0, 512\)"):
        ContrastiveTask.from_pairs(stories_model, [{**good, "corrupt": [1, 600, 6]}])
    with pytest.raises(ValueError, match=r"outside the model's vocabulary"):
        ContrastiveTask.from_pairs(stories_model, [{**good, "distractor": 512}])
    long = list(range(3, 3 + stories_model.cfg.n_ctx + 1))
    with pytest.raises(ValueError, match=f"but the model's context is {stories_model.cfg.n_ctx}"):
        ContrastiveTask.from_pairs(stories_model, [{**good, "clean": long, "corrupt": long}])
