"""The device: profiles, the budget arithmetic, device selection and measured memory."""
