// @generated automatically by Diesel CLI.

pub mod sql_types {
    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "operation_status"))]
    pub struct OperationStatus;

    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "ticket_channel"))]
    pub struct TicketChannel;

    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "ticket_priority"))]
    pub struct TicketPriority;

    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "ticket_status"))]
    pub struct TicketStatus;

    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "user_role"))]
    pub struct UserRole;
}

diesel::table! {
    audit_log (id) {
        id -> Int8,
        operation_id -> Int8,
        table_name -> Text,
        row_id -> Int8,
        action -> Text,
        before -> Nullable<Jsonb>,
        after -> Nullable<Jsonb>,
        at -> Timestamptz,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::OperationStatus;

    bulk_operations (id) {
        id -> Int8,
        kind -> Text,
        args -> Jsonb,
        operator -> Text,
        source_file -> Nullable<Text>,
        source_sha256 -> Nullable<Text>,
        started_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        status -> OperationStatus,
        counts -> Jsonb,
        checkpoint -> Nullable<Jsonb>,
        message -> Nullable<Text>,
    }
}

diesel::table! {
    comments (id) {
        id -> Int8,
        external_id -> Nullable<Text>,
        ticket_id -> Int8,
        author_id -> Int8,
        body -> Text,
        public -> Bool,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    organizations (id) {
        id -> Int8,
        name -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    tags (id) {
        id -> Int8,
        name -> Text,
    }
}

diesel::table! {
    ticket_tags (ticket_id, tag_id) {
        ticket_id -> Int8,
        tag_id -> Int8,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::TicketStatus;
    use super::sql_types::TicketPriority;
    use super::sql_types::TicketChannel;

    tickets (id) {
        id -> Int8,
        external_id -> Text,
        #[max_length = 500]
        subject -> Varchar,
        description -> Nullable<Text>,
        status -> TicketStatus,
        priority -> TicketPriority,
        channel -> TicketChannel,
        requester_id -> Int8,
        assignee_id -> Nullable<Int8>,
        organization_id -> Nullable<Int8>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        solved_at -> Nullable<Timestamptz>,
        deleted_at -> Nullable<Timestamptz>,
        last_operation_id -> Nullable<Int8>,
        import_fingerprint -> Nullable<Bytea>,
    }
}

diesel::table! {
    ticketops_layout (singleton) {
        singleton -> Bool,
        layout -> Text,
        chosen_at -> Timestamptz,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::UserRole;

    users (id) {
        id -> Int8,
        email -> Text,
        name -> Nullable<Text>,
        role -> UserRole,
        organization_id -> Nullable<Int8>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        deleted_at -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(audit_log -> bulk_operations (operation_id));
diesel::joinable!(comments -> tickets (ticket_id));
diesel::joinable!(comments -> users (author_id));
diesel::joinable!(ticket_tags -> tags (tag_id));
diesel::joinable!(ticket_tags -> tickets (ticket_id));
diesel::joinable!(tickets -> bulk_operations (last_operation_id));
diesel::joinable!(tickets -> organizations (organization_id));
diesel::joinable!(users -> organizations (organization_id));

diesel::allow_tables_to_appear_in_same_query!(
    audit_log,
    bulk_operations,
    comments,
    organizations,
    tags,
    ticket_tags,
    ticketops_layout,
    tickets,
    users,
);
