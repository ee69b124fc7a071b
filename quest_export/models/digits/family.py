"""The digits demo's facts for general code (see models/family.py)."""

from quest_export.models.family import ModelFamily

# 10 labels embedded as 4 tokens; guidance 2.0 is what the demo was tuned with; sampling 250
# images per call keeps the 500-sample evaluation at two calls
DIGITS = ModelFamily("digits", default_guidance=2.0, class_conditional=True, trace_tokens=4, images_per_call=250, shipped=True,
                     metric_classifier=True)
