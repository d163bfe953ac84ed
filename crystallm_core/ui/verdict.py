"""A structure's validity verdict for the pages: passed or failed with the reasons, and which
space-group rule judged it (the model's text: exact; a user's file: subgroups allowed)."""
from __future__ import annotations

import streamlit as st

from crystallm_core.product.service import SPACE_GROUP_RULES, ValidityReport


def validity_verdict(report: ValidityReport) -> None:
    space_group = next((c for c in report.checks if c.name == "space_group"), None)
    if report.valid:
        st.success(f"Valid: passes every check ({space_group.reason})." if space_group else "Valid.")
    else:
        st.warning("This structure failed validation: " + "; ".join(report.failed_reasons))
    whose = "your file" if report.space_group_rule == "subgroup" else "the model's text"
    st.caption(f"Space-group rule for {whose}: **{report.space_group_rule}**, "
               f"{SPACE_GROUP_RULES[report.space_group_rule]}.")
