"""The responses the OpenAI Responses API gave out, each with the ChatIQ
conversation it continues (``previous_response_id``), kept per tenant: in this
process, or in Redis for a fleet. A service: it imports only the vocabulary."""
