"""Probes of frozen embeddings on a labelled set, and the scores they are judged by.

* Logistic regression on standardized features; its inverse regularisation C is chosen on val.
* kNN: the k train items most cosine-similar to a test item vote; the vote shares are its class
  probabilities.
* eva's probe: one linear layer on the raw embedding, cross-entropy, AdamW; the state with the lowest
  val loss is kept, and training stops when val loss has not improved for a while. Seeded, so it is
  run several times and reported as mean and std.
* Top-k same-class retrieval: a test query is a hit when one of its k nearest train items (cosine)
  has its class (Acc@k).

Scores: balanced accuracy, macro F1 and, for two classes, AUROC of the second class's probability.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch import nn

from pipeline.config import EvaluateConfig

SEEDED_PROBES = frozenset({"linear"})
LINEAR_CHECK_EVERY = 25  # steps between val-loss checks of the linear probe
LINEAR_PATIENCE = 20  # checks without a better val loss before the linear probe stops
QUERY_BLOCK = 1024  # queries per similarity block: bounds memory on 100k-item train sets


@dataclass(frozen=True, eq=False)
class ProbeData:
    """Embeddings and class indices of the three splits."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    n_classes: int

    @classmethod
    def from_splits(cls, embeddings: np.ndarray, labels: np.ndarray, splits: np.ndarray, n_classes: int) -> ProbeData:
        parts = {split: (embeddings[splits == split].astype(np.float32), labels[splits == split]) for split in ("train", "val", "test")}
        return cls(*parts["train"], *parts["val"], *parts["test"], n_classes)


def scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float | None]:
    """Balanced accuracy, macro F1 over every class, and AUROC when there are two classes."""
    n_classes = probabilities.shape[1]
    predicted = probabilities.argmax(1)
    two_present = n_classes == 2 and len(np.unique(labels)) == 2
    return {
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=np.arange(n_classes), average="macro", zero_division=0)),
        "auroc": float(roc_auc_score(labels, probabilities[:, 1])) if two_present else None,
    }


def logistic_probe(data: ProbeData, c_grid: list[float]) -> tuple[np.ndarray, dict]:
    """Test probabilities of the C with the best val balanced accuracy (the smallest such C)."""
    scaler = StandardScaler().fit(data.train)
    train, val, test = (scaler.transform(x) for x in (data.train, data.val, data.test))
    best_accuracy, best_model, best_c = -1.0, None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in sorted(c_grid):
            model = LogisticRegression(C=c, max_iter=1000).fit(train, data.train_labels)
            accuracy = balanced_accuracy_score(data.val_labels, model.predict(val))
            if accuracy > best_accuracy:
                best_accuracy, best_model, best_c = accuracy, model, c
    probabilities = np.zeros((len(test), data.n_classes))
    probabilities[:, best_model.classes_] = best_model.predict_proba(test)
    return probabilities, {"C": best_c}


def knn_probe(data: ProbeData, k: int) -> np.ndarray:
    """Vote shares of the k nearest train items (cosine) as class probabilities."""
    neighbours = nearest(data.test, data.train, min(k, len(data.train)))
    votes = np.eye(data.n_classes)[data.train_labels[neighbours]]  # [queries, k, classes]
    return votes.mean(axis=1)


def linear_probe(data: ProbeData, seed: int, steps: int, lr: float, batch_size: int) -> np.ndarray:
    """eva's single linear layer: AdamW on cross-entropy, the state of lowest val loss kept."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny steps: more threads only add hand-over costs (10x on 2 busy cores)
    try:
        return _train_linear(data, seed, steps, lr, batch_size)
    finally:
        torch.set_num_threads(threads)


def _train_linear(data: ProbeData, seed: int, steps: int, lr: float, batch_size: int) -> np.ndarray:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(data.train.shape[1], data.n_classes)
    sampler = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(data.train), torch.from_numpy(data.train_labels)
    x_val, y_val = torch.from_numpy(data.val), torch.from_numpy(data.val_labels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    best_loss, best_state, checks_since_best = float("inf"), copy.deepcopy(head.state_dict()), 0
    for step in range(1, steps + 1):
        batch = torch.randint(len(x), (min(batch_size, len(x)),), generator=sampler)
        loss = F.cross_entropy(head(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % LINEAR_CHECK_EVERY == 0:
            with torch.no_grad():
                val_loss = F.cross_entropy(head(x_val), y_val).item()
            if val_loss < best_loss:
                best_loss, best_state, checks_since_best = val_loss, copy.deepcopy(head.state_dict()), 0
            elif (checks_since_best := checks_since_best + 1) >= LINEAR_PATIENCE:
                break
    head.load_state_dict(best_state)
    with torch.no_grad():
        return torch.softmax(head(torch.from_numpy(data.test)), dim=1).numpy()


def nearest(queries: np.ndarray, database: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Indices [queries, k] of the k most cosine-similar database rows, most similar first.
    ``exclude_self``: queries are the database, and a row is not its own neighbour."""
    database_t = F.normalize(torch.from_numpy(database).float(), dim=1)
    queries_t = F.normalize(torch.from_numpy(queries).float(), dim=1)
    found = []
    for first in range(0, len(queries_t), QUERY_BLOCK):
        similarity = queries_t[first : first + QUERY_BLOCK] @ database_t.T
        if exclude_self:
            rows = torch.arange(len(similarity))
            similarity[rows, rows + first] = -torch.inf
        found.append(similarity.topk(k, dim=1).indices)
    return torch.cat(found).numpy()


def retrieval_accuracy(data: ProbeData, ks: list[int]) -> dict[str, float]:
    """Acc@k: the share of test queries with an item of their own class among their k nearest train items."""
    neighbours = nearest(data.test, data.train, min(max(ks), len(data.train)))
    same_class = data.train_labels[neighbours] == data.test_labels[:, None]
    return {f"top{k}": float(same_class[:, :k].any(axis=1).mean()) for k in sorted(ks)}


def run_probes(data: ProbeData, settings: EvaluateConfig) -> dict[str, dict]:
    """Per probe: each score's mean and std over the runs, the number of runs, and what was chosen."""
    results = {}
    for probe in settings.probes:
        seeds = range(settings.seeds) if probe in SEEDED_PROBES else range(1)
        runs, chosen = [], {}
        for seed in seeds:
            if probe == "logreg":
                probabilities, chosen = logistic_probe(data, settings.logreg_c)
            elif probe == "knn":
                probabilities = knn_probe(data, settings.knn_k)
            else:
                probabilities = linear_probe(data, seed, settings.linear_steps, settings.linear_lr, settings.linear_batch)
            runs.append(scores(data.test_labels, probabilities))
        results[probe] = {**summarise(runs), "runs": len(runs), **chosen}
    return results


def summarise(runs: list[dict[str, float | None]]) -> dict[str, dict[str, float] | None]:
    """Mean and std (over runs) of each score; None for a score no run has."""
    summary = {}
    for name in runs[0]:
        values = [run[name] for run in runs if run[name] is not None]
        summary[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None
    return summary
