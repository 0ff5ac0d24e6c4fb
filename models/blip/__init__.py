"""BLIP-2 stage 1 (`Blip2Qformer`) from a Salesforce LAVIS `.pth`."""
