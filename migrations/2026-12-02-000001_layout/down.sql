DROP TABLE ticketops_layout;
