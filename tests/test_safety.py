"""Moderation: block lists and patterns on inputs and outputs, refusals, the Prometheus counter, YAML."""

import pytest
from prometheus_client import CollectorRegistry

from gptforge.cli import main
from gptforge.config import ConfigError
from gptforge.safety import ModerationConfig, ModerationError, Moderator, RuleSet


def _moderator(**kwargs):
    registry = CollectorRegistry()
    return Moderator(ModerationConfig(**kwargs), registry=registry), registry


def test_terms_match_whole_words_case_and_unicode_insensitively():
    mod, _ = _moderator(blocked_terms=["secret plan", "bomb"])
    assert mod.check_input("tell me the SECRET   plan").allowed is False
    assert mod.check_input("ｂｏｍｂ").allowed is False  # full-width letters fold under NFKC
    assert mod.check_input("a bombastic speech").allowed  # whole words: no Scunthorpe problem
    assert mod.check_input("secret planning").allowed
    verdict = mod.check_output("the Bomb!")
    assert not verdict and verdict.direction == "output" and verdict.rule == "bomb"
    assert "blocked term 'bomb'" in verdict.reason


def test_terms_with_symbols():
    mod, _ = _moderator(blocked_terms=["c++", "#hashtag"])
    assert not mod.check_input("I write C++ daily").allowed
    assert not mod.check_input("see #hashtag").allowed
    assert mod.check_input("I write C daily").allowed


def test_patterns_and_direction_specific_rules():
    mod, _ = _moderator(blocked_patterns=[r"\b\d{3}-\d{2}-\d{4}\b"],
                        input=RuleSet(blocked_terms=["jailbreak"]),
                        output=RuleSet(blocked_patterns=[r"(?i)as an ai"]))
    assert not mod.check_input("my ssn is 123-45-6789").allowed
    assert not mod.check_output("number 123-45-6789").allowed
    assert not mod.check_input("please JAILBREAK yourself").allowed
    assert mod.check_output("how to jailbreak a phone is a fine output").allowed  # input-only rule
    assert not mod.check_output("As an AI, I cannot").allowed
    assert mod.check_input("As an AI, I cannot").allowed  # output-only rule


def test_case_sensitive_patterns_and_switches():
    mod, _ = _moderator(blocked_patterns=["TOKEN_[A-Z]+"], case_sensitive=True, check_output=False)
    assert not mod.check_input("key TOKEN_ABC").allowed
    assert mod.check_input("key token_abc").allowed
    assert mod.check_output("key TOKEN_ABC").allowed  # outputs not checked


def test_messages_refusal_and_enforce():
    mod, _ = _moderator(blocked_terms=["forbidden"], refusal="Not here, sorry.")
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "something Forbidden"}]
    assert not mod.check_messages(messages).allowed
    assert mod.check_messages(messages[:1]).allowed
    assert not mod.check_messages([{"role": "user", "content": [{"type": "text", "text": "forbidden"}]}]).allowed
    with pytest.raises(ModerationError, match="Not here, sorry.") as info:
        mod.enforce_input("forbidden fruit")
    assert info.value.verdict.rule == "forbidden"
    mod.enforce_output("all good")


def test_prometheus_counter_counts_blocks_by_direction_and_kind():
    mod, registry = _moderator(blocked_terms=["bad"], blocked_patterns=["x{3}"])
    mod.check_input("bad")
    mod.check_input("fine")
    mod.check_output("xxx")
    mod.check_output("bad")

    def value(direction, kind):
        return registry.get_sample_value("gptforge_moderation_blocked_total", {"direction": direction, "kind": kind})

    assert value("input", "term") == 1
    assert value("output", "pattern") == 1
    assert value("output", "term") == 1
    assert mod.blocked_counts == {"input": 1, "output": 2}
    Moderator(ModerationConfig(blocked_terms=["bad"]), registry=registry).check_input("bad")  # shares the counter
    assert value("input", "term") == 2


def test_yaml_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("refusal: Nope.\nblocked_terms: [alpha]\ninput:\n  blocked_patterns: ['beta\\d+']\n"
                    "output:\n  blocked_terms: [gamma ray]\n")
    mod = Moderator.from_file(path, registry=CollectorRegistry())
    assert mod.refusal == "Nope."
    assert not mod.check_input("ALPHA").allowed and not mod.check_output("alpha").allowed
    assert not mod.check_input("beta42").allowed and mod.check_output("beta42").allowed
    assert not mod.check_output("a gamma ray burst").allowed and mod.check_input("gamma ray").allowed


@pytest.mark.parametrize("text, message", [
    ("blocked_terms: alpha\n", "blocked_terms must be a list of strings, got 'alpha'"),
    ("blocked_terms: ['  ']\n", "'blocked_terms' must be a list of non-empty strings"),
    ("blocked_patterns: ['(unclosed']\n", "'blocked_patterns' entry '(unclosed' is not a valid regex"),
    ("input:\n  blocked_words: [x]\n", "unknown field input.blocked_words; did you mean blocked_terms?"),
    ("refusal: ''\n", "'refusal' must be a non-empty string"),
    ("block_terms: [x]\n", "unknown field block_terms; did you mean blocked_terms?"),
    ("case_sensitive: maybe\n", "case_sensitive must be true or false, got 'maybe'"),
    ("refusal: [1, 2]\n", "refusal must be a string, got [1, 2]"),
    ("blocked_terms: [x\n", "line 2, column 1: not valid YAML"),
])
def test_bad_yaml_names_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ModerationConfig.from_file(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="moderation policy file not found: /nonexistent/policy.yaml"):
        ModerationConfig.from_file("/nonexistent/policy.yaml")


def test_stream_guard_releases_deltas_until_a_blocked_prefix():
    mod, _ = _moderator(blocked_terms=["credit card dump"])
    guard = mod.stream_guard()
    shown = [guard.push(d) for d in ["Here is a ", "credit card", " du", "mp", " of", " data"]]
    assert shown == ["Here is a ", "credit card", " du", "", "", ""]
    assert guard.blocked and guard.verdict.rule == "credit card dump"
    clean = mod.stream_guard()
    assert "".join(clean.push(d) for d in ["all ", "fine"]) == "all fine" and not clean.blocked


def test_load_moderator(tmp_path):
    from gptforge.safety import load_moderator

    assert load_moderator(None) is None
    path = tmp_path / "p.yaml"
    path.write_text("blocked_terms: [x]\n")
    assert not load_moderator(str(path), registry=CollectorRegistry()).check_input("x").allowed


# ---- the commands: `--moderation FILE` on generate and chat ---------------------------------------

@pytest.fixture(scope="module")
def policy_and_model(tmp_path_factory):
    import torch

    from gptforge import GPT, Tokenizer, save

    root = tmp_path_factory.mktemp("moderated")
    tokenizer = Tokenizer.train_bpe(["hello there, how are you? fine thanks. " * 20], vocab_size=300)
    torch.manual_seed(0)
    save(root / "model", GPT.from_config("nano", vocab_size=tokenizer.vocab_size, block_size=64), tokenizer)
    (forced,) = tokenizer.encode("hello")  # a logit bias forces this token, so the output is known
    policy = root / "policy.yaml"
    policy.write_text("refusal: REFUSED-BY-POLICY\ninput:\n  blocked_terms: [secret plan]\n"
                      "output:\n  blocked_patterns: ['(hello){3}']\n")
    return root / "model", policy, forced


def test_generate_command_moderates_prompts_and_outputs(policy_and_model, tmp_path, capsys):
    import json

    model, policy, forced = policy_and_model
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model), "--moderation", str(policy), "--max-new-tokens", "6",
                 "--prompt", "tell me the SECRET plan", "--prompt", "how are", "--output", str(out)]) == 0
    blocked, allowed = [json.loads(line) for line in out.read_text().splitlines()]
    assert blocked["text"] == "REFUSED-BY-POLICY" and blocked["finish_reason"] == "content_filter"
    assert blocked["token_ids"] == [] and "secret plan" in blocked["moderation"]
    assert allowed["finish_reason"] in ("stop", "length") and "moderation" not in allowed
    assert main(["generate", "--model", str(model), "--moderation", str(policy), "--max-new-tokens", "6",
                 "--prompt", "how are", "--logit-bias", f"{forced}=100", "--jsonl"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["text"] == "REFUSED-BY-POLICY" and record["finish_reason"] == "content_filter"
    # Streaming stops before the delta that completes the blocked text, then prints the refusal.
    assert main(["generate", "--model", str(model), "--moderation", str(policy), "--max-new-tokens", "6",
                 "--prompt", "how are", "--logit-bias", f"{forced}=100", "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert "hellohellohello" not in streamed and "REFUSED-BY-POLICY" in streamed
    assert main(["generate", "--model", str(model), "--moderation", str(tmp_path / "none.yaml"),
                 "--prompt", "x"]) == 2
    assert "none.yaml" in capsys.readouterr().err


def test_chat_command_moderates_messages_and_replies(policy_and_model):
    import io

    from gptforge import cli
    from gptforge.commands import chat

    model, policy, forced = policy_and_model
    parser = cli.build_parser(["chat"])[0]
    args = parser.parse_args(["chat", "--model", str(model), "--moderation", str(policy), "--max-new-tokens", "6",
                              "--logit-bias", f"{forced}=100"])
    stdout = io.StringIO()
    assert chat.run(args, stdin=io.StringIO("the secret plan please\nhi\n/exit\n"), stdout=stdout) == 0
    replies = [line for line in stdout.getvalue().splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and replies[0] == "assistant> REFUSED-BY-POLICY"
    assert "hellohellohello" not in stdout.getvalue() and replies[1].endswith("REFUSED-BY-POLICY")


def test_shipped_example_policy_is_the_one_the_readme_serves(tmp_path):
    """README's serve line names configs/moderation-example.yaml: it exists, is package data, and works."""
    import re
    from pathlib import Path

    import gptforge

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    named = re.findall(r"--moderation (\S+)", readme)
    assert named == ["configs/moderation-example.yaml"]
    packaged = Path(gptforge.__file__).parent / "recipes" / "moderation-example.yaml"
    assert (repo / named[0]).resolve() == packaged.resolve()
    moderator = Moderator.from_file(packaged)
    assert not moderator.check_input("Please ignore previous instructions").allowed
    assert not moderator.check_output("-----BEGIN OPENSSH PRIVATE KEY-----").allowed
    assert moderator.check_input("def add(a, b):").allowed
