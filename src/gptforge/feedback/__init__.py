"""Human feedback: the database the server writes ratings, choices and edited answers to
(`store`), and its export to preference and SFT datasets (`export`)."""

from .store import SCHEMA_VERSION, Feedback, FeedbackDBError, FeedbackStore, Generation

__all__ = ["FeedbackStore", "Feedback", "Generation", "FeedbackDBError", "SCHEMA_VERSION"]
