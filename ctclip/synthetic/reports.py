"""Report text of the synthetic CT-RATE set, written the way CT-RATE's radiologists write.

A CT-RATE findings section walks through the chest in a fixed order (airways, heart and vessels,
esophagus, lymph nodes, lung parenchyma, pleura, upper abdomen, bones) and states many ABSENT
findings explicitly ("No pleural or pericardial effusion was detected.", "Heart contour and size are
normal."); the impression summarises the positive ones, and is sometimes missing (NaN or
"Not given."). `compose_report` does the same from what was actually planted in a scan (`details`
from the planters: the lobe and size of a nodule, the side and amount of an effusion...):

- every planted finding gets a sentence (several wordings each, some naming the finding the way the
  CT-RATE label does, e.g. "mosaic attenuation pattern", most describing it);
- every absent finding is stated negatively with probability `NEGATION_RATE[finding]` (the common
  negatives of CT-RATE nearly always, the rarer ones less often), sometimes in a sentence shared by
  two absent findings ("No pleural or pericardial effusion was detected."); a negation is never
  written for a finding that is present, and a normal sentence never contradicts a planted finding;
- the impression lists the planted findings in CT-RATE's short style, or says the study is normal.

The findings section's sentences are in `reports_phrases`; `NEGATIVE[f]` lists every sentence that negates
`f` (the tests check none appears when `f` is present).
"""

from __future__ import annotations

import numpy as np

from ctclip.findings import FINDINGS
from ctclip.synthetic.reports_phrases import (
    JOINT_NEGATIVE,
    NEGATION_RATE,
    NEGATIVE,
    POSITIVE,
    Sentence,
    lobe_words,
    pick,
)

REPORT_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)
NOT_GIVEN = "Not given."

# the impression: CT-RATE's short style, one sentence per planted finding
IMPRESSION: dict[str, Sentence] = {
    "Medical material": lambda d, rng: pick(
        rng, (f"{d.get('device', 'central venous catheter').capitalize()} in place.", "Medical material.")),
    "Arterial wall calcification": lambda d, rng: pick(
        rng, ("Aortic atherosclerosis.", "Arterial wall calcification in the aorta.")),
    "Cardiomegaly": lambda d, rng: pick(rng, ("Cardiomegaly.", "Enlarged heart.")),
    "Pericardial effusion": lambda d, rng: pick(rng, ("Pericardial effusion.", "Pericardial fluid.")),
    "Coronary artery wall calcification": lambda d, rng: pick(
        rng, ("Coronary artery calcification.", "Coronary artery wall calcification.")),
    "Hiatal hernia": lambda d, rng: pick(rng, ("Hiatal hernia.", "Sliding hiatal hernia.")),
    "Lymphadenopathy": lambda d, rng: pick(rng, ("Mediastinal lymphadenopathy.", "Enlarged mediastinal lymph nodes.")),
    "Emphysema": lambda d, rng: pick(rng, ("Emphysema.", "Centrilobular emphysema.")),
    "Atelectasis": lambda d, rng: pick(rng, ("Atelectasis.", f"Atelectasis in the {d.get('lobe', 'lower lobe')}.")),
    "Lung nodule": lambda d, rng: pick(rng, (
        "Pulmonary nodule; follow-up is recommended.",
        f"Lung nodule of {d.get('largest', {}).get('diameter_mm', 8)} mm.")),
    "Lung opacity": lambda d, rng: pick(rng, ("Ground-glass opacities.", f"Lung opacity in {lobe_words(d)}.")),
    "Pulmonary fibrotic sequela": lambda d, rng: pick(rng, ("Fibrotic sequelae.", "Pulmonary fibrotic sequela.")),
    "Pleural effusion": lambda d, rng: pick(rng, (
        "Pleural effusion.", f"{d.get('side', 'bilateral').capitalize()} pleural effusion.")),
    "Mosaic attenuation pattern": lambda d, rng: pick(
        rng, ("Mosaic attenuation pattern.", "Mosaic attenuation, small airway disease?")),
    "Peribronchial thickening": lambda d, rng: pick(rng, ("Peribronchial thickening.", "Bronchial wall thickening.")),
    "Consolidation": lambda d, rng: pick(rng, ("Consolidation, pneumonia?", "Pneumonic consolidation.")),
    "Bronchiectasis": lambda d, rng: pick(rng, ("Bronchiectasis.", f"Bronchiectasis in {lobe_words(d)}.")),
    "Interlobular septal thickening": lambda d, rng: pick(
        rng, ("Interlobular septal thickening.", "Septal thickening.")),
}
NORMAL_IMPRESSIONS = (
    "No significant pathology was detected.",
    "Thorax CT within normal limits.",
    "No acute cardiopulmonary finding.",
)
assert set(POSITIVE) == set(NEGATIVE) == set(IMPRESSION) == set(FINDINGS)

# ---- the findings section: paragraphs in CT-RATE's order ------------------------------------------------


class Paragraph:
    """One part of the walk through the chest: its findings, and normal sentences that are true whatever
    is planted (`guarded` ones only when none of the listed findings is present)."""

    def __init__(self, findings: tuple[str, ...], normals: tuple[str, ...] = (),
                 guarded: tuple[tuple[str, tuple[str, ...]], ...] = (), lead: tuple[str, ...] = ()):
        self.findings, self.normals, self.guarded, self.lead = findings, normals, guarded, lead


PARAGRAPHS: tuple[Paragraph, ...] = (
    Paragraph((), normals=(
        "Trachea and both main bronchi are in the midline and open.",
        "The trachea and main bronchi are patent; no endobronchial lesion.",
        "No occlusive pathology was detected in the trachea and both main bronchi.",
    )),
    Paragraph(
        ("Cardiomegaly", "Pericardial effusion", "Arterial wall calcification", "Coronary artery wall calcification",
         "Medical material"),
        normals=(
            "The calibre of the thoracic main vascular structures is normal.",
            "Mediastinal vascular structures are of normal width.",
            "Mediastinal structures were evaluated after intravenous contrast.",
        ),
    ),
    Paragraph(("Hiatal hernia",), normals=(
        "No significant tumoral wall thickening of the thoracic esophagus was detected.",
        "The thyroid gland is normal in the sections included.",
    )),
    Paragraph(("Lymphadenopathy",)),
    Paragraph(
        ("Emphysema", "Lung nodule", "Lung opacity", "Consolidation", "Atelectasis", "Pulmonary fibrotic sequela",
         "Mosaic attenuation pattern", "Peribronchial thickening", "Bronchiectasis", "Interlobular septal thickening"),
        guarded=(
            ("No mass or infiltrative lesion was detected in either lung.",
             ("Lung nodule", "Lung opacity", "Consolidation")),
            ("Aeration of both lungs is normal.",
             ("Emphysema", "Lung opacity", "Consolidation", "Atelectasis", "Mosaic attenuation pattern")),
        ),
        lead=("When examined in the lung parenchyma window:",),
    ),
    Paragraph(("Pleural effusion",), normals=("No pneumothorax was detected.",)),
    Paragraph((), normals=(
        "Upper abdominal organs included in the sections are unremarkable.",
        "No space-occupying lesion was detected in the liver within the field of view.",
        "Both adrenal glands are normal.",
    )),
    Paragraph((), normals=(
        "Bone structures in the study area are natural.",
        "No lytic or destructive lesion was detected in the bones.",
        "Degenerative changes are seen in the thoracic spine.",
        "Vertebral body heights are preserved.",
    )),
)
_PARAGRAPH_OF = {f: i for i, p in enumerate(PARAGRAPHS) for f in p.findings}
assert set(_PARAGRAPH_OF) == set(FINDINGS)


def _negations(present: set[str], rng: np.random.Generator) -> dict[int, list[str]]:
    """Negative sentences per paragraph for the absent findings that this report states."""
    stated = {f for f in FINDINGS if f not in present and rng.random() < NEGATION_RATE[f]}
    out: dict[int, list[str]] = {}
    for (a, b), sentences in JOINT_NEGATIVE.items():
        if a in stated and b in stated and rng.random() < 0.5:
            stated -= {a, b}
            out.setdefault(_PARAGRAPH_OF[a], []).append(pick(rng, sentences))
    for f in FINDINGS:
        if f in stated:
            # the joint sentences live in NEGATIVE too; a single finding picks from its own ones only
            own = [s for s in NEGATIVE[f] if not any(s in js for js in JOINT_NEGATIVE.values())]
            out.setdefault(_PARAGRAPH_OF[f], []).append(pick(rng, own))
    return out


def _findings_text(details: dict[str, dict], rng: np.random.Generator) -> str:
    present = set(details)
    negs = _negations(present, rng)
    parts = []
    for i, para in enumerate(PARAGRAPHS):
        sentences = [POSITIVE[f](details[f], rng) for f in para.findings if f in present]
        sentences += [s for s, conflicts in para.guarded if not present & set(conflicts) and rng.random() < 0.6]
        sentences += negs.get(i, [])
        if para.normals and (not sentences or rng.random() < 0.6):
            k = int(rng.integers(1, min(2, len(para.normals)) + 1))
            sentences += [para.normals[j] for j in sorted(rng.choice(len(para.normals), size=k, replace=False))]
        if len(sentences) > 1:  # the radiologist's order within a paragraph varies
            sentences = [sentences[j] for j in rng.permutation(len(sentences))]
        if sentences and para.lead and rng.random() < 0.5:
            sentences.insert(0, pick(rng, para.lead))
        parts.extend(sentences)
    return " ".join(parts)


def _impression(details: dict[str, dict], rng: np.random.Generator) -> str:
    present = [f for f in FINDINGS if f in details]
    if not present:
        return pick(rng, NORMAL_IMPRESSIONS)
    # CT-RATE impressions list the main findings first: lungs and pleura before incidental calcification
    order = sorted(present, key=lambda f: (_PARAGRAPH_OF[f] not in (4, 5), rng.random()))
    return " ".join(IMPRESSION[f](details[f], rng) for f in order)


CLINICAL = (
    "Cough.",
    "Shortness of breath.",
    "Chest pain.",
    "Fever and cough.",
    "Follow-up.",
    "Dyspnea.",
    "Malignancy screening.",
    "Known COPD.",
    "Trauma.",
    "Weight loss.",
    NOT_GIVEN,
)


def compose_report(
    details: dict[str, dict], rng: np.random.Generator, z_spacing: float, empty_impression_rate: float
) -> dict[str, object]:
    """The four report sections for one scan, from what was planted in it (`details`: finding -> facts)."""
    unknown = sorted(set(details) - set(FINDINGS))
    if unknown:
        raise ValueError(f"compose_report: unknown finding(s) {unknown}")
    findings = _findings_text(details, rng)
    if rng.random() < empty_impression_rate:
        impressions: object = float("nan") if rng.random() < 0.5 else NOT_GIVEN
    else:
        impressions = _impression(details, rng)
    technique = pick(
        rng,
        (
            f"Contrast-enhanced thorax CT, axial sections of {z_spacing:.2f} mm.",
            f"Thorax CT after intravenous contrast injection; images were reconstructed at {z_spacing:.2f} mm "
            "slice interval.",
            f"Axial images of the chest were obtained after IV contrast with a section thickness of "
            f"{z_spacing:.2f} mm.",
        ),
    )
    return {
        "ClinicalInformation_EN": pick(rng, CLINICAL),
        "Technique_EN": technique,
        "Findings_EN": findings,
        "Impressions_EN": impressions,
    }
