"""Governance of a federation: who counts how much, and who may de-anonymise whom.

``weighting`` turns cooperatives' claimed sizes into aggregation weights under a policy
(FedAvg, equal, sqrt, capped) and measures how concentrated they are; ``escrow`` seals
the HE secret key so that only a threshold of an oversight board can open it. Neither
imports Flower.
"""

from .escrow import BoardShare, EscrowError, open_escrow, read_share, seal, write_escrow, write_shares
from .weighting import INFLUENCE_KEYS, WEIGHTING_POLICIES, influence, mean_influence, policy_weights

__all__ = ["WEIGHTING_POLICIES", "INFLUENCE_KEYS", "policy_weights", "influence", "mean_influence", "EscrowError",
           "BoardShare", "seal", "write_escrow", "write_shares", "read_share", "open_escrow"]
