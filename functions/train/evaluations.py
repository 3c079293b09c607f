"""The evaluations a finished run reports, in order; a new evaluation (a probe, an attack) is one function added
to FINAL_EVALUATIONS."""
from __future__ import annotations

from typing import Any

from functions.evaluation.context import Evaluation, EvaluationContext
from functions.evaluation.mocosfl import mocosfl_probes
from functions.evaluation.probes import knn_accuracy, linear_probe, semi_supervised_probes
from functions.privacy.attack_run import attack_on_client


def knn_evaluation(context: EvaluationContext) -> dict[str, Any]:
    """kNN accuracy (percent) of the test set against the memory set (--knn_k, --knn_t)."""
    train_features, train_labels, test_features, test_labels = context.features
    return {"knn_acc": knn_accuracy(train_features, train_labels, test_features, test_labels, context.num_classes,
                                    k=context.options.knn_k, temperature=context.options.knn_t)}


def final_knn_evaluation(context: EvaluationContext) -> dict[str, Any]:
    """The kNN accuracy of the evaluated model; under --eval_protocol mocosfl, that of the best-kNN epoch, so
    selected on the test set and named so."""
    result = knn_evaluation(context)
    return {"knn_acc_test_selected": result["knn_acc"]} if context.test_selected else result


def probe_evaluation(context: EvaluationContext) -> dict[str, Any]:
    """Final-epoch linear probe on all labels and on 1 % and 10 % of them (--linear_epochs; off with --skip_linear);
    under --eval_protocol mocosfl, MocoSFL's probes and their best test epochs instead (functions.evaluation.mocosfl)."""
    options = context.options
    if options.skip_linear:
        return {"linear_acc_test_selected" if context.test_selected else "linear_acc": None}
    if context.test_selected:
        return mocosfl_probes(*context.raw_features, context.num_classes, epochs=options.linear_epochs,
                              seed=options.seed, device=context.device)
    train_features, train_labels, test_features, test_labels = context.features
    probe = linear_probe(train_features, train_labels, test_features, test_labels, context.num_classes,
                         epochs=options.linear_epochs, seed=options.seed, device=context.device)
    return {"linear_acc": probe["test_acc"],
            **semi_supervised_probes(train_features, train_labels, test_features, test_labels, context.num_classes,
                                     epochs=options.linear_epochs, seed=options.seed, device=context.device)}


def attack_evaluation(context: EvaluationContext) -> dict[str, Any]:
    """With --attack: the model-inversion attack on a client's smashed data (functions.privacy.attack_run)."""
    if context.options.attack is None:
        return {}
    return attack_on_client(context)


FINAL_EVALUATIONS: list[Evaluation] = [final_knn_evaluation, probe_evaluation, attack_evaluation]
