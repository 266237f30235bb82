"""Arena: Elo and Bradley-Terry recover known strengths; BT equals a logistic-regression fit; bad battle files."""

import json

import numpy as np
import pytest

from llmkit.eval.arena import (BattleError, arena, bradley_terry, format_leaderboard, online_elo, plot_ratings,
                               plot_win_rates, read_battles, win_rate_matrix)

TRUE = {"alpha": 1250.0, "bravo": 1150.0, "charlie": 1000.0, "delta": 900.0, "echo": 700.0}


def synthetic_battles(n: int = 3000, seed: int = 0, tie_rate: float = 0.1) -> list[dict]:
    """Battles drawn from the Bradley-Terry model with the TRUE ratings (and some ties)."""
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        p = 1 / (1 + 10 ** ((TRUE[names[b]] - TRUE[names[a]]) / 400))
        u = rng.random()
        winner = "tie" if u < tie_rate else ("model_a" if rng.random() < p else "model_b")
        out.append({"model_a": names[a], "model_b": names[b], "winner": winner})
    return out


def test_elo_and_bt_recover_the_true_order():
    battles = synthetic_battles()
    order = sorted(TRUE, key=lambda m: -TRUE[m])
    bt = bradley_terry(battles)
    elo = online_elo(battles)
    assert sorted(bt, key=lambda m: -bt[m]) == order
    assert sorted(elo, key=lambda m: -elo[m]) == order
    # BT is on the Elo scale: gaps close to the true ones (ties pull ratings together a little)
    assert bt["alpha"] - bt["echo"] == pytest.approx(TRUE["alpha"] - TRUE["echo"], rel=0.2)
    assert np.mean(list(bt.values())) == pytest.approx(1000.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # sklearn 1.8+ deprecates penalty=None
def test_bradley_terry_equals_logistic_regression():
    """FastChat's compute_mle_elo: every battle twice, ties one win each way, sklearn without intercept."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    battles = synthetic_battles(800, seed=1)
    models = sorted(TRUE)
    idx = {m: i for i, m in enumerate(models)}
    doubled = battles + battles
    X = np.zeros((len(doubled), len(models)))
    Y = np.zeros(len(doubled))
    for row, x in enumerate(doubled):
        X[row, idx[x["model_a"]]] = np.log(10)
        X[row, idx[x["model_b"]]] = -np.log(10)
        Y[row] = x["winner"] == "model_a" or (x["winner"] == "tie" and row < len(battles))
    lr = sklearn.LogisticRegression(fit_intercept=False, penalty=None, tol=1e-10, max_iter=10000)
    lr.fit(X, Y)
    reference = 400 * lr.coef_[0] + 1000
    reference = reference - reference.mean() + 1000  # pin the free shift as ours is pinned
    ours = bradley_terry(battles)
    for m in models:
        assert ours[m] == pytest.approx(reference[idx[m]], abs=1e-3)


def test_online_elo_is_fastchats_update():
    battles = [{"model_a": "x", "model_b": "y", "winner": "model_a"},
               {"model_a": "y", "model_b": "x", "winner": "tie"}]
    r = online_elo(battles)
    # first battle: equal ratings, expected 0.5 -> x +2, y -2
    ea = 1 / (1 + 10 ** ((1002 - 998) / 400))  # y's expectation in the second battle
    assert r["y"] == pytest.approx(998 + 4 * (0.5 - ea))
    assert r["x"] == pytest.approx(1002 + 4 * (0.5 - (1 - ea)))


def test_bootstrap_intervals_leaderboard_and_plots(tmp_path):
    battles = synthetic_battles(600, seed=2)
    result = arena(battles, rounds=200, seed=0)
    assert [row["model"] for row in result["leaderboard"]][0] == "alpha"
    for m in TRUE:
        low, high = result["bradley_terry_ci"][m]
        assert low <= result["bradley_terry"][m] <= high
        assert high - low < 150
    same_seed = [arena(battles, rounds=50, seed=3)["bradley_terry_ci"] for _ in range(2)]
    assert same_seed[0] == same_seed[1]
    wr = win_rate_matrix(battles)
    assert wr["alpha"]["echo"] > 0.7 and wr["alpha"]["alpha"] is None
    assert wr["alpha"]["echo"] + wr["echo"]["alpha"] <= 1.0  # ties are battles without a winner
    text = format_leaderboard(result)
    assert "alpha" in text and "win rate" in text
    for path in (plot_ratings(result, tmp_path / "r.png"), plot_win_rates(result, tmp_path / "w.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("line,message", [
    ('{"model_a": "x", "model_b": "y"}', r"b\.jsonl:2: missing field 'winner'"),
    ('{"model_a": "x", "model_b": "y", "winner": "both"}', r"b\.jsonl:2: field 'winner' must be"),
    ('{"model_a": "x", "model_b": "x", "winner": "tie"}', r"b\.jsonl:2: model_a and model_b are both"),
    ('{"model_a": "x", "model_b": "y", "winner": "tie",}', r"b\.jsonl:2: not valid JSON"),
    ('["x", "y", "tie"]', r"b\.jsonl:2: expected a JSON object"),
])
def test_malformed_battle_file_names_the_line(tmp_path, line, message):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"model_a": "x", "model_b": "y", "winner": "x"}) + "\n" + line + "\n")
    with pytest.raises(BattleError, match=message):
        read_battles(f)


def test_winner_may_be_a_model_name(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"model_a": "x", "model_b": "y", "winner": "y"}) + "\n")
    assert read_battles(f)[0]["winner"] == "model_b"


def test_cli(tmp_path, capsys):
    from llmkit.cli import main

    f = tmp_path / "b.jsonl"
    f.write_text("".join(json.dumps(b) + "\n" for b in synthetic_battles(300, seed=4)))
    assert main(["eval", "arena", "--battles", str(f), "--rounds", "20", "--plot", str(tmp_path / "p.png"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["leaderboard"][0]["model"] == "alpha" and (tmp_path / "p.png").is_file()
    f.write_text('{"model_a": "x"}\n')
    assert main(["eval", "arena", "--battles", str(f)]) == 2
    assert "b.jsonl:1: missing field 'model_b'" in capsys.readouterr().err
