"""ADRMX (Demirel et al., 2023, "ADRMX: additive disentanglement of domain features with remix loss"),
DomainBed's ``ADRMX``: a label featurizer and a domain featurizer whose difference ``z_label − z_domain`` is
the domain-invariant feature. Every ``1 + d_steps_per_g_step`` updates, ``d_steps_per_g_step`` train a
discriminator to find the domain in it, and one trains the rest against it with two classifiers' losses, the
domain classifier's, a supervised contrastive loss weighing in-domain positives by λ = 0.5 (DomainBed's
``SupConLossLambda``) and the "remix" loss: per class, the invariant feature of one sample plus the domain
feature of another, classified as the first's label."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lightning.domainbed.algorithm import DomainBedAlgorithm, Minibatches
from fishr_lightning.domainbed.networks import MLP, Classifier


def supcon_lambda_loss(
    features_ND: Tensor, labels_N: Tensor, domains_N: Tensor, lamda: float = 0.5, temperature: float = 0.07
) -> Tensor:
    """DomainBed's ``misc.SupConLossLambda``: for each anchor, ``−Σ_pos log(w_p e^{s_p} / (Σ_all w e^{s} + 1e-5)
    + 1e-5) / n_pos`` with cosine similarities ``s / temperature`` and weights ``λ`` in the anchor's domain,
    ``1 − λ`` outside; anchors whose term is NaN (no positive) skipped; the sum over ``N − skipped + 1``."""
    normalized_ND = F.normalize(features_ND, p=2, dim=1)
    dots_NN = normalized_ND @ normalized_ND.T / temperature
    loss, nans = 0, 0
    for i, (label, domain) in enumerate(zip(labels_N, domains_N)):
        pos_in = (labels_N == label) & (domains_N == domain)
        pos_in[i] = False  # not itself
        pos_out = (labels_N == label) & (domains_N != domain)
        neg_in = (labels_N != label) & (domains_N == domain)
        neg_out = (labels_N != label) & (domains_N != domain)
        positives = torch.cat(
            (lamda * torch.exp(dots_NN[pos_in][:, i]), (1 - lamda) * torch.exp(dots_NN[pos_out][:, i]))
        )
        negatives = torch.cat(
            (lamda * torch.exp(dots_NN[neg_in][:, i]), (1 - lamda) * torch.exp(dots_NN[neg_out][:, i]))
        )
        denominator = torch.sum(torch.cat((negatives, positives))) + 1e-5
        loss_i = torch.sum(torch.log(positives / denominator + 1e-5)) / (int(pos_in.sum()) + int(pos_out.sum()))
        if torch.isnan(loss_i):
            nans += 1
            continue
        loss = loss - loss_i
    return loss / (len(features_ND) - nans + 1)


class ADRMX(DomainBedAlgorithm):
    """DomainBed's networks and names: ``featurizer_label``, ``featurizer_domain``, ``discriminator`` (an MLP of
    ``mlp_depth``), ``classifier_label_1``, ``classifier_label_2``, ``classifier_domain`` (nonlinear), ``network
    = Sequential(featurizer_label, classifier_label_1)``; ``disc_opt`` and ``opt``, betas ``(beta1, 0.9)``. The
    remix pairs are drawn from ``self.generator()``."""

    ddp_refusal = (
        "its contrastive and remix losses pair samples across the whole batch, which a rank's shard does not hold"
    )
    quirks = (
        "the remix pairs two samples of a class whatever their domains (DomainBed's comment says different domains)",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("update_count", torch.tensor([0]))
        self.mix_num = 1
        self.featurizer_label = self.make_featurizer()
        self.featurizer_domain = self.make_featurizer()
        width = self.featurizer_domain.n_outputs
        self.discriminator = MLP(width, self.num_domains, dict(self.hparams))
        self.classifier_label_1 = Classifier(self.featurizer_label.n_outputs, self.num_classes, is_nonlinear=True)
        self.classifier_label_2 = Classifier(self.featurizer_label.n_outputs, self.num_classes, is_nonlinear=True)
        self.classifier_domain = Classifier(width, self.num_domains, is_nonlinear=True)
        self.network = nn.Sequential(self.featurizer_label, self.classifier_label_1)

    @property
    def featurizer(self) -> nn.Module:  # the app's hooks (BatchNorm checks, input config) read the label featurizer
        return self.featurizer_label

    @property
    def classifier(self) -> nn.Module:
        return self.classifier_label_1

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (self.hparams["beta1"], 0.9)
        generator = [
            *self.featurizer_label.parameters(),
            *self.featurizer_domain.parameters(),
            *self.classifier_label_1.parameters(),
            *self.classifier_label_2.parameters(),
            *self.classifier_domain.parameters(),
        ]
        return {
            "disc_opt": torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams["lr"], betas=betas),
            "opt": torch.optim.Adam(generator, lr=self.hparams["lr"], betas=betas),
        }

    def draw_remix_pairs(self, y_N: Tensor) -> list[tuple[int, int] | None]:
        """Per class (and ``mix_num``), two of its samples in a random order (DomainBed's ``torch.randperm``), or
        ``None`` when the class has fewer than two."""
        generator, pairs = self.generator("remix"), []
        for label in range(self.num_classes):
            indices = torch.where(y_N.cpu() == label)[0]
            for _ in range(self.mix_num):
                perm = torch.randperm(indices.numel(), generator=generator)
                pairs.append((int(perm[0]), int(perm[1])) if len(perm) >= 2 else None)
        return pairs

    def update(self, minibatches: Minibatches, unlabeled: Minibatches | None = None) -> dict[str, float]:
        self.update_count += 1
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        feat_label, feat_domain = self.featurizer_label(all_x), self.featurizer_domain(all_x)
        feat_combined = feat_label - feat_domain
        disc_labels = torch.cat(
            [torch.full((len(x),), i, dtype=torch.int64, device=x.device) for i, (x, _) in enumerate(minibatches)]
        )
        disc_loss = F.cross_entropy(self.discriminator(feat_combined), disc_labels)
        d_steps_per_g = self.hparams["d_steps_per_g_step"]
        if self.update_count.item() % (1 + d_steps_per_g) < d_steps_per_g:  # the discriminator's turn
            self.optimizer_named("disc_opt").zero_grad()
            self.manual_backward(disc_loss)
            self.step("disc_opt")
            return {"loss_disc": disc_loss.item()}
        classifier_loss_domain = F.cross_entropy(self.classifier_domain(feat_domain), disc_labels)
        classifier_loss_int = F.cross_entropy(self.classifier_label_1(feat_label), all_y)
        cnt_loss_int = supcon_lambda_loss(feat_label, all_y, disc_labels)
        classifier_loss_final = F.cross_entropy(self.classifier_label_2(feat_combined), all_y)
        cnt_loss_final = supcon_lambda_loss(feat_combined, all_y, disc_labels)
        remixed_loss = torch.zeros((), dtype=feat_label.dtype, device=feat_label.device)
        pairs = self.draw_remix_pairs(all_y)
        for label, pair in zip((c for c in range(self.num_classes) for _ in range(self.mix_num)), pairs):
            if pair is None:
                continue
            indices = torch.where(all_y == label)[0]
            first, second = indices[pair[0]], indices[pair[1]]
            prediction = self.classifier_label_1((feat_combined[first] + feat_domain[second]).view(1, -1))
            remixed_loss = remixed_loss + F.cross_entropy(prediction.view(1, -1), all_y[first].view(-1))
        remixed_loss = remixed_loss / (self.num_classes * self.mix_num)
        hparams = self.hparams
        gen_loss = (
            classifier_loss_int
            + classifier_loss_final
            + hparams["dclf_lambda"] * classifier_loss_domain
            + hparams["rmxd_lambda"] * remixed_loss
            + hparams["cnt_lambda"] * (cnt_loss_int + cnt_loss_final)
            + hparams["disc_lambda"] * -disc_loss
        )
        self.optimizer_named("disc_opt").zero_grad()
        self.optimizer_named("opt").zero_grad()
        self.manual_backward(gen_loss)
        self.step("opt")
        return {
            "loss_total": gen_loss.item(),
            "loss_cnt_int": float(torch.as_tensor(cnt_loss_int).detach()),
            "loss_cnt_final": float(torch.as_tensor(cnt_loss_final).detach()),
            "loss_clf_int": classifier_loss_int.item(),
            "loss_clf_fin": classifier_loss_final.item(),
            "loss_dmn": classifier_loss_domain.item(),
            "loss_disc": disc_loss.item(),
            "loss_remixed": remixed_loss.item(),
        }

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)
